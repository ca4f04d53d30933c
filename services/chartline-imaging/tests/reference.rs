//! Agreement with the Python reference pipeline in `tests/fixtures/image-preprocessing.json`
//! (Pillow + the slow, Pillow-based Hugging Face processors; pydicom + pylibjpeg-openjpeg).
//!
//! Tolerances: after `x / 255` and `(x - 0.5) / 0.5`, one `u8` level is `2/255 ≈ 0.00784`.
//! * PNG: decoding is lossless and our resize reproduces Pillow's fixed-point arithmetic
//!   exactly, so every sample must equal the reference up to `f32` rounding (1e-6).
//! * JPEG: JPEG decoders may differ by a level per sample (IDCT precision, chroma
//!   upsampling; ITU T.81 only bounds IDCT accuracy), and `jpeg-decoder` is not
//!   libjpeg-turbo. After the resize's weighted sums, a sample may round differently
//!   by up to two levels; observed on the fundus photograph: ~5% of samples off by one,
//!   at most 2 of 4000 off by two. The bound is two levels, with at most 10% of samples
//!   off and channel means within 1e-3 (an eighth of a level), so a systematic error
//!   (wrong colour conversion, a shifted resize) still fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use chartline_imaging::{Limits, Preprocessor, decode, dicom_stored_values};
use serde_json::Value;

/// One `u8` level after rescale (1/255) and normalisation with std 0.5.
const ONE_LEVEL: f64 = 2.0 / 255.0;
/// `f32` rounding of values in [-1, 1] through the rescale and normalisation steps.
const F32_SLACK: f64 = 1e-6;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn images_dir() -> PathBuf {
    repo_root().join("../shared/fixtures/images")
}

fn reference() -> Value {
    let path = repo_root().join("tests/fixtures/image-preprocessing.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reference {} must be readable: {e}", path.display()));
    serde_json::from_str(&text).expect("the reference file is JSON")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{} must be readable: {e}", path.display()))
}

fn as_usize(v: &Value) -> usize {
    v.as_u64().expect("a non-negative integer") as usize
}

#[test]
fn preprocessed_pixels_match_the_hugging_face_processors() {
    let reference = reference();
    let cases = reference["cases"].as_array().expect("`cases` is a list");
    assert!(
        cases.len() >= 4,
        "the reference covers PNG and JPEG under both processors"
    );
    let mut report = Vec::new();
    for case in cases {
        let file = case["file"].as_str().expect("`file` is a string");
        let processor = case["processor"].as_str().expect("`processor` is a string");
        let config = repo_root().join(format!(
            "tests/fixtures/{processor}/preprocessor_config.json"
        ));
        let pre = Preprocessor::from_json_file(&config).unwrap();
        let img = decode(&read(&images_dir().join(file)), None, &Limits::default()).unwrap();
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(as_usize)
            .collect();
        assert_eq!(
            pre.output_shape(&img).to_vec(),
            shape,
            "{file} / {processor}: output shape"
        );
        let out = pre.preprocess(&img);
        assert_eq!(
            out.len(),
            shape.iter().product::<usize>(),
            "{file} / {processor}: length"
        );

        let samples = case["samples"].as_array().unwrap();
        assert!(
            samples.len() >= 1000,
            "{file} / {processor}: the reference has samples"
        );
        let mut max_err = 0f64;
        let mut off_by_more_than_rounding = 0usize;
        for s in samples {
            let (j, want) = (as_usize(&s[0]), s[1].as_f64().unwrap());
            let err = (f64::from(out[j]) - want).abs();
            max_err = max_err.max(err);
            if err > F32_SLACK {
                off_by_more_than_rounding += 1;
            }
        }
        let plane = shape[1] * shape[2];
        let mut mean_err = 0f64;
        let mut std_err = 0f64;
        for c in 0..3 {
            let chan = &out[c * plane..(c + 1) * plane];
            let mean = chan.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64;
            let var = chan
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / plane as f64;
            mean_err = mean_err.max((mean - case["channel_mean"][c].as_f64().unwrap()).abs());
            std_err = std_err.max((var.sqrt() - case["channel_std"][c].as_f64().unwrap()).abs());
        }
        report.push(format!(
            "{file} / {processor}: max |err| {max_err:.3e} ({:.2} u8 levels), {off_by_more_than_rounding}/{} samples off by more than f32 rounding, channel mean err {mean_err:.2e}, std err {std_err:.2e}",
            max_err / ONE_LEVEL,
            samples.len()
        ));
        if file.ends_with(".png") {
            assert!(
                max_err <= F32_SLACK,
                "{file} / {processor}: lossless input, so every sample equals Pillow's, got {max_err}"
            );
        } else {
            assert!(
                max_err <= 2.0 * ONE_LEVEL + F32_SLACK,
                "{file} / {processor}: every sample within two u8 levels of the reference, got {max_err}"
            );
            assert!(
                off_by_more_than_rounding * 10 <= samples.len(),
                "{file} / {processor}: at most 10% of samples differ from the reference, got {off_by_more_than_rounding}"
            );
        }
        // Per-pixel errors of at most one level that are rare average to far less.
        assert!(
            mean_err < 1e-3,
            "{file} / {processor}: channel means agree, off by {mean_err}"
        );
        assert!(
            std_err < 1e-3,
            "{file} / {processor}: channel stds agree, off by {std_err}"
        );
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn dicom_stored_values_match_pydicom() {
    let reference = reference();
    let files = reference["dicom"].as_array().expect("`dicom` is a list");
    assert!(
        files.len() >= 2,
        "the reference covers the J2K radiograph and the CT"
    );
    for case in files {
        let file = case["file"].as_str().unwrap();
        let stored = dicom_stored_values(&read(&images_dir().join(file))).unwrap();
        assert_eq!(
            stored.rows as usize,
            as_usize(&case["rows"]),
            "{file}: rows"
        );
        assert_eq!(
            stored.columns as usize,
            as_usize(&case["columns"]),
            "{file}: columns"
        );
        assert_eq!(
            usize::from(stored.samples_per_pixel),
            as_usize(&case["samples_per_pixel"]),
            "{file}: samples per pixel"
        );
        let v = &stored.values;
        assert_eq!(
            v.iter().min().copied().map(i64::from),
            case["min"].as_i64(),
            "{file}: min"
        );
        assert_eq!(
            v.iter().max().copied().map(i64::from),
            case["max"].as_i64(),
            "{file}: max"
        );
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let want_mean = case["mean"].as_f64().unwrap();
        assert!(
            (mean - want_mean).abs() < 1e-6 * want_mean.abs().max(1.0),
            "{file}: mean {mean} vs {want_mean}"
        );
        let samples = case["samples"].as_array().unwrap();
        assert!(samples.len() >= 1000, "{file}: the reference has samples");
        let mismatches: Vec<(usize, i32, i64)> = samples
            .iter()
            .map(|s| (as_usize(&s[0]), s[1].as_i64().unwrap()))
            .filter(|&(j, want)| i64::from(v[j]) != want)
            .map(|(j, want)| (j, v[j], want))
            .collect();
        assert!(
            mismatches.is_empty(),
            "{file}: stored values equal pydicom's exactly; {} of {} differ, first: {:?}",
            mismatches.len(),
            samples.len(),
            &mismatches[..mismatches.len().min(5)]
        );
    }
}
