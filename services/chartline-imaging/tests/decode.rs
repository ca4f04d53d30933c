//! Decoding the shared fixture images and refusing bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use chartline_imaging::{
    ImageError, Limits, Preprocessor, SourceFormat, decode, dicom_stored_values,
};

fn fixture(rel: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/images")
        .join(rel);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("fixture {} must be readable: {e}", path.display()))
}

const CXR: &str = "cxr/nih-cxr14-00000001_000.png";
const FUNDUS: &str = "fundus/skimage-retina.jpg";
const J2K: &str = "dicom/RG1_J2KI.dcm";
const CT: &str = "dicom/CT_small.dcm";

#[test]
fn chest_xray_png_decodes_to_512_square_grey_rgb() {
    let img = decode(&fixture(CXR), Some("image/png"), &Limits::default()).unwrap();
    assert_eq!((img.width, img.height), (512, 512));
    assert_eq!(img.format, SourceFormat::Png);
    assert_eq!(img.rgb.len(), 512 * 512 * 3);
    assert!(
        img.rgb
            .chunks_exact(3)
            .all(|p| p[0] == p[1] && p[1] == p[2]),
        "a greyscale PNG becomes RGB with equal channels"
    );
    assert!(
        img.rgb.iter().any(|&v| v > 128),
        "the radiograph is not blank"
    );
}

#[test]
fn fundus_jpeg_decodes_to_colour() {
    let img = decode(&fixture(FUNDUS), Some("image/jpeg"), &Limits::default()).unwrap();
    assert_eq!(img.format, SourceFormat::Jpeg);
    assert_eq!(img.rgb.len(), img.width as usize * img.height as usize * 3);
    assert_eq!((img.width, img.height), (1411, 1411));
    assert!(
        img.rgb.chunks_exact(3).any(|p| p[0] != p[2]),
        "a retina photograph has colour"
    );
}

#[test]
fn jpeg2000_chest_radiograph_dicom_decodes() {
    let bytes = fixture(J2K);
    let img = decode(&bytes, Some("application/dicom"), &Limits::default()).unwrap();
    assert_eq!((img.width, img.height), (1841, 1955), "Columns x Rows");
    let SourceFormat::Dicom {
        transfer_syntax,
        photometric,
        frames,
    } = &img.format
    else {
        panic!("DICOM input reports a DICOM format: {:?}", img.format);
    };
    assert_eq!(
        transfer_syntax, "1.2.840.10008.1.2.4.91",
        "JPEG 2000 (lossy) syntax"
    );
    assert_eq!(photometric, "MONOCHROME1");
    assert_eq!(*frames, 1);
    let stored = dicom_stored_values(&bytes).unwrap();
    assert_eq!((stored.columns, stored.rows), (img.width, img.height));
    assert_eq!(stored.values.len(), (img.width * img.height) as usize);
    let (min, max) = stored
        .values
        .iter()
        .fold((i32::MAX, i32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!(
        (min, max),
        (803, 26512),
        "stored range as pydicom reports it"
    );
    // Window 15000/30000 maps stored 0..30000 onto 0..255; MONOCHROME1 inverts, so the
    // lowest stored value is the brightest pixel.
    let expected_brightest =
        255 - (((f64::from(min) - 14999.5) / 29999.0 + 0.5) * 255.0).round() as u8;
    assert_eq!(
        img.rgb.iter().max().copied(),
        Some(expected_brightest),
        "windowed and inverted"
    );
}

#[test]
fn uncompressed_ct_dicom_decodes_to_128_square() {
    let bytes = fixture(CT);
    let img = decode(&bytes, None, &Limits::default()).unwrap();
    assert_eq!((img.width, img.height), (128, 128));
    assert_eq!(
        img.format,
        SourceFormat::Dicom {
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            photometric: "MONOCHROME2".into(),
            frames: 1
        }
    );
    let stored = dicom_stored_values(&bytes).unwrap();
    assert_eq!(
        (stored.rows, stored.columns, stored.samples_per_pixel),
        (128, 128, 1)
    );
    let (min, max) = stored
        .values
        .iter()
        .fold((i32::MAX, i32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!(
        (min, max),
        (128, 2191),
        "stored range as pydicom reports it"
    );
    // No window: min-max of the rescaled frame spans 0..=255.
    assert_eq!(img.rgb.iter().min().copied(), Some(0));
    assert_eq!(img.rgb.iter().max().copied(), Some(255));
}

fn expect_err(result: Result<chartline_imaging::DecodedImage, ImageError>) -> ImageError {
    match result {
        Ok(img) => panic!("expected an error, got {img:?}"),
        Err(e) => e,
    }
}

#[test]
fn truncated_png_is_corrupt() {
    let bytes = fixture(CXR);
    let err = expect_err(decode(&bytes[..bytes.len() / 2], None, &Limits::default()));
    assert!(
        matches!(err, ImageError::Corrupt { format: "PNG", .. }),
        "{err}"
    );
}

#[test]
fn truncated_jpeg_is_corrupt() {
    let bytes = fixture(FUNDUS);
    let err = expect_err(decode(&bytes[..bytes.len() / 2], None, &Limits::default()));
    assert!(
        matches!(err, ImageError::Corrupt { format: "JPEG", .. }),
        "{err}"
    );
}

#[test]
fn truncated_dicom_is_corrupt_before_the_parser_allocates() {
    for name in [CT, J2K] {
        let bytes = fixture(name);
        for cut in [200, 1000, bytes.len() / 2, bytes.len() - 1] {
            let err = expect_err(decode(&bytes[..cut], None, &Limits::default()));
            assert!(
                matches!(
                    err,
                    ImageError::Corrupt {
                        format: "DICOM",
                        ..
                    }
                ),
                "{name} cut at {cut}: {err}"
            );
        }
    }
}

#[test]
fn dicom_element_claiming_four_gibibytes_is_refused_without_allocating() {
    let mut bytes = fixture(CT);
    // Find the Pixel Data header (7FE0,0010) OW and make its length 0xFFFF_FFF0.
    let at = bytes
        .windows(6)
        .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00, b'O', b'W'])
        .expect("the CT has native pixel data");
    bytes[at + 8..at + 12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let err = expect_err(decode(&bytes, None, &Limits::default()));
    assert!(
        err.to_string()
            .contains("(7FE0,0010) declares 4294967280 bytes"),
        "{err}"
    );
}

#[test]
fn dicom_without_preamble_decodes_like_with_it() {
    let bytes = fixture(CT);
    let with = decode(&bytes, None, &Limits::default()).unwrap();
    let without = decode(&bytes[128..], Some("application/dicom"), &Limits::default()).unwrap();
    assert_eq!(with, without);
}

#[test]
fn gif_pdf_text_and_empty_input_are_unsupported_and_named() {
    let cases: [(&[u8], &str); 4] = [
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "GIF"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
        (b"Patient: Jane Doe, chest pain since Tuesday", "text"),
        (b"", "empty"),
    ];
    for (bytes, named) in cases {
        let err = expect_err(decode(bytes, None, &Limits::default()));
        assert!(
            matches!(err, ImageError::UnsupportedFormat { .. }),
            "{named}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(named), "the message names {named}: {msg}");
        assert!(
            !msg.contains("Jane"),
            "the message never echoes input bytes: {msg}"
        );
    }
}

#[test]
fn content_type_that_disagrees_with_the_bytes_is_refused_naming_both() {
    let png = fixture(CXR);
    let err = expect_err(decode(&png, Some("image/jpeg"), &Limits::default()));
    assert!(matches!(err, ImageError::UnsupportedFormat { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("image/jpeg") && msg.contains("PNG"), "{msg}");

    let err = expect_err(decode(&png, Some("image/gif"), &Limits::default()));
    assert!(err.to_string().contains("image/gif"), "{err}");

    let ok = decode(&png, Some("Image/PNG; charset=binary"), &Limits::default());
    assert!(
        ok.is_ok(),
        "content types are case-insensitive and parameters are ignored"
    );
    let ok = decode(&png, Some("application/octet-stream"), &Limits::default());
    assert!(
        ok.is_ok(),
        "octet-stream declares nothing, so the bytes decide"
    );
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG with a valid IHDR claiming `width x height` and a tiny IDAT.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

#[test]
fn png_header_claiming_100000_square_is_too_large_before_decoding() {
    let err = expect_err(decode(
        &png_claiming(100_000, 100_000),
        None,
        &Limits::default(),
    ));
    assert!(
        matches!(
            err,
            ImageError::TooLarge {
                what: "width",
                actual: 100_000,
                limit: 30_000
            }
        ),
        "{err}"
    );
    let err = expect_err(decode(
        &png_claiming(20_000, 20_000),
        None,
        &Limits::default(),
    ));
    assert!(
        matches!(
            err,
            ImageError::TooLarge {
                what: "pixels",
                actual: 400_000_000,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn limits_apply_to_every_format() {
    let tight = Limits {
        max_pixels: 10_000,
        ..Limits::default()
    };
    for name in [CXR, FUNDUS, J2K, CT] {
        let err = expect_err(decode(&fixture(name), None, &tight));
        assert!(
            matches!(err, ImageError::TooLarge { what: "pixels", .. }),
            "{name}: {err}"
        );
    }
    let small_input = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    let err = expect_err(decode(&fixture(CXR), None, &small_input));
    assert!(
        matches!(
            err,
            ImageError::TooLarge {
                what: "input bytes",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn preprocessing_a_fixture_gives_the_configured_shape() {
    let pre = Preprocessor::from_json_str(
        r#"{"image_processor_type": "SiglipImageProcessor", "size": {"height": 64, "width": 48}}"#,
    )
    .unwrap();
    assert_eq!(pre.size(), (64, 48));
    let img = decode(&fixture(CT), None, &Limits::default()).unwrap();
    assert_eq!(pre.output_shape(&img), [3, 64, 48]);
    let out = pre.preprocess(&img);
    assert_eq!(out.len(), 3 * 64 * 48);
    assert!(
        out.iter().all(|v| (-1.0..=1.0).contains(v)),
        "mean/std 0.5 keeps values in [-1, 1]"
    );
}
