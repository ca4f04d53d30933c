//! Preprocessor config parsing and the arithmetic after the resize.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chartline_imaging::{DecodedImage, Filter, ImageError, Preprocessor, SourceFormat};

fn image(width: u32, height: u32, rgb: Vec<u8>) -> DecodedImage {
    DecodedImage {
        width,
        height,
        rgb,
        format: SourceFormat::Png,
    }
}

fn config_error(json: &str) -> (String, String) {
    match Preprocessor::from_json_str(json) {
        Err(ImageError::InvalidConfig { key, detail }) => (key, detail),
        other => panic!("expected InvalidConfig for {json}, got {other:?}"),
    }
}

#[test]
fn normalisation_with_half_mean_and_std_maps_0_to_minus_1_and_255_to_1() {
    let pre = Preprocessor::from_json_str(
        r#"{"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 1, "width": 2},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 0.00392156862745098}"#,
    )
    .unwrap();
    let out = pre.preprocess(&image(2, 1, vec![0, 0, 0, 255, 255, 255]));
    // CHW: channel 0 is [pixel 0, pixel 1], then channel 1, then channel 2.
    assert_eq!(out, vec![-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]);
}

#[test]
fn output_is_channels_first() {
    let pre = Preprocessor::from_json_str(
        r#"{"image_processor_type": "SiglipImageProcessor", "size": {"height": 1, "width": 2}, "do_normalize": false, "do_rescale": false}"#,
    )
    .unwrap();
    let out = pre.preprocess(&image(2, 1, vec![1, 2, 3, 4, 5, 6]));
    assert_eq!(out, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
}

#[test]
fn hugging_face_configs_of_both_processor_classes_parse() {
    let gemma = Preprocessor::from_json_str(
        r#"{"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 896, "width": 896}, "resample": 2, "do_pan_and_scan": false}"#,
    )
    .unwrap();
    assert_eq!(
        (gemma.size(), gemma.filter()),
        ((896, 896), Filter::Bilinear)
    );
    let siglip = Preprocessor::from_json_str(
        r#"{"image_processor_type": "SiglipImageProcessor", "size": {"height": 448, "width": 448}}"#,
    )
    .unwrap();
    assert_eq!(
        (siglip.size(), siglip.filter()),
        ((448, 448), Filter::Bicubic),
        "Siglip defaults to bicubic"
    );
}

#[test]
fn unsupported_or_malformed_keys_are_named() {
    let cases = [
        (
            r#"{"image_processor_type": "SiglipImageProcessor", "size": {"shortest_edge": 448}}"#,
            "size",
            "shortest_edge",
        ),
        (
            r#"{"image_processor_type": "SiglipImageProcessor", "resample": 0}"#,
            "resample",
            "0",
        ),
        (
            r#"{"image_processor_type": "SiglipImageProcessor", "resample": 9}"#,
            "resample",
            "9",
        ),
        (
            r#"{"size": {"height": 8, "width": 8}}"#,
            "resample",
            "missing",
        ),
        (
            r#"{"image_processor_type": "SiglipImageProcessorFast"}"#,
            "image_processor_type",
            "torchvision",
        ),
        (
            r#"{"image_processor_type": "CLIPImageProcessor"}"#,
            "image_processor_type",
            "CLIPImageProcessor",
        ),
        (
            r#"{"image_processor_type": "Gemma3ImageProcessor", "do_pan_and_scan": true}"#,
            "do_pan_and_scan",
            "pan and scan",
        ),
        (
            r#"{"image_processor_type": "Gemma3ImageProcessor", "image_mean": [0.5, 0.5]}"#,
            "image_mean",
            "2 values",
        ),
        (
            r#"{"image_processor_type": "Gemma3ImageProcessor", "image_std": [0.5, 0, 0.5]}"#,
            "image_std",
            "0",
        ),
        (
            r#"{"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 0, "width": 8}}"#,
            "size",
            "height",
        ),
        (
            r#"{"image_processor_type": "Gemma3ImageProcessor", "do_resize": "yes"}"#,
            "do_resize",
            "true or false",
        ),
        ("[1, 2]", "<json>", "object"),
        ("{", "<json>", "EOF"),
    ];
    for (json, key, mentions) in cases {
        let (got_key, detail) = config_error(json);
        assert_eq!(got_key, key, "{json}");
        assert!(
            detail.contains(mentions),
            "{json}: `{detail}` mentions {mentions}"
        );
    }
}

#[test]
fn missing_config_file_names_the_path() {
    let err = Preprocessor::from_json_file("/nonexistent/preprocessor_config.json").unwrap_err();
    assert!(
        err.to_string()
            .contains("/nonexistent/preprocessor_config.json"),
        "{err}"
    );
}
