//! The SigLIP dual encoder (MedSigLIP's architecture) against Hugging Face `transformers`
//! on the same random-weight checkpoint (`tests/fixtures/tiny-medsiglip`, made by
//! `scripts/make-tiny-multimodal.sh`): token ids, image and text embeddings, logits and
//! zero-shot probabilities; then the real chart images through the same path, and bad input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use chartline_inference::{ImageInput, ImageTextEmbedder, SiglipDualEncoder};
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-medsiglip")
}

fn shared_image(rel: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/images")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixture().join("reference.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    fn walk(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
            _ => panic!("not a number: {v}"),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

fn rows_u32(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

const TOL: f32 = 2e-5;

fn level(c: usize, y: usize, x: usize) -> u8 {
    ((c * 131 + y * 31 + x * 17) % 255) as u8
}

/// The reference's synthetic image as normalized pixels (1, 3, S, S).
fn pixels(size: usize) -> Tensor {
    let mut v = Vec::with_capacity(3 * size * size);
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                v.push((f64::from(level(c, y, x)) / 127.5 - 1.0) as f32);
            }
        }
    }
    Tensor::from_vec(v, (1, 3, size, size), &Device::Cpu).unwrap()
}

/// The same image as a PNG file.
fn png(size: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            for c in 0..3 {
                data.push(level(c, y, x));
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, size as u32, size as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(&data).unwrap();
    }
    out
}

fn image(data: Vec<u8>, content_type: Option<&str>) -> ImageInput {
    ImageInput {
        data,
        content_type: content_type.map(str::to_owned),
        source: None,
    }
}

fn labels(r: &Value) -> Vec<String> {
    r["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn embeddings_and_logits_match_transformers() {
    let model = SiglipDualEncoder::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let r = reference();
    let labels = labels(&r);

    // Token ids and masks, padded to 64 as SiglipProcessor(padding="max_length") does.
    let want_ids = rows_u32(&r["input_ids"]);
    let want_mask = rows_u32(&r["attention_mask"]);
    for (i, label) in labels.iter().enumerate() {
        let (ids, mask) = model.text_ids(label).unwrap();
        assert_eq!(ids, want_ids[i], "ids of {label:?}");
        assert_eq!(mask, want_mask[i], "mask of {label:?}");
    }

    // Pooled image features from pixels (the attention-pooling head).
    let img = model.image_features(&pixels(448)).unwrap();
    let err = rel_err(
        &img.flatten_all().unwrap().to_vec1().unwrap(),
        &floats(&r["image_embeds_unnormalized"]),
    );
    assert!(err < TOL, "image features: rel err {err}");

    // Text features, with the padding mask (the reference's main path) and without it.
    let n = labels.len();
    let ids = Tensor::from_vec(want_ids.concat(), (n, 64), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(want_mask.concat(), (n, 64), &Device::Cpu).unwrap();
    let text = model.text_features(&ids, Some(&mask)).unwrap();
    let err = rel_err(
        &text.flatten_all().unwrap().to_vec1().unwrap(),
        &floats(&r["text_embeds_unnormalized"]),
    );
    assert!(err < TOL, "text features: rel err {err}");
    let unmasked = model.text_features(&ids, None).unwrap();
    let err = rel_err(
        &unmasked.flatten_all().unwrap().to_vec1().unwrap(),
        &floats(&r["text_embeds_unnormalized_no_attention_mask"]),
    );
    assert!(err < TOL, "text features without mask: rel err {err}");

    // From a PNG file through decoding and preprocessing: normalized embeddings, logits and
    // the sigmoid probabilities.
    let embedded = model
        .embed_images(&[image(png(448), Some("image/png"))])
        .unwrap();
    assert!(rel_err(&embedded[0], &floats(&r["image_embeds"])) < TOL);
    let texts = model.embed_texts(&labels).unwrap();
    assert!(rel_err(&texts.concat(), &floats(&r["text_embeds"])) < TOL);
    let scores = model.classify(&image(png(448), None), &labels).unwrap();
    let want_logits = floats(&r["logits_per_image"]);
    let want_probs = floats(&r["probs"]);
    for (i, s) in scores.iter().enumerate() {
        assert_eq!(s.label, labels[i]);
        assert!(
            (s.logit - want_logits[i]).abs() < 1e-4,
            "logit {i}: {} vs {}",
            s.logit,
            want_logits[i]
        );
        assert!(
            (s.probability - want_probs[i]).abs() < 1e-6,
            "probability {i}"
        );
        // SigLIP semantics: each label's own sigmoid, not a softmax over labels.
        assert!((s.probability - 1.0 / (1.0 + (-s.logit).exp())).abs() < 1e-7);
    }
    let sum: f32 = scores.iter().map(|s| s.probability).sum();
    assert!(
        (sum - want_probs.iter().sum::<f32>()).abs() < 1e-5,
        "probabilities need not sum to 1 (sum {sum})"
    );
}

#[tokio::test]
async fn chart_images_embed_and_classify_on_the_model_thread() {
    let model = ImageTextEmbedder::load(fixture()).unwrap();
    assert_eq!(model.dimension(), 32);
    let images = vec![
        image(
            shared_image("cxr/nih-cxr14-00000001_000.png"),
            Some("image/png"),
        ),
        image(
            shared_image("fundus/skimage-retina.jpg"),
            Some("image/jpeg"),
        ),
        image(
            shared_image("dicom/RG1_J2KI.dcm"),
            Some("application/dicom"),
        ),
        image(shared_image("dicom/CT_small.dcm"), None),
    ];
    let vectors = model.embed_images(images.clone()).await.unwrap();
    assert_eq!(vectors.len(), 4);
    for v in &vectors {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "unit length");
    }
    // Different images, different embeddings.
    assert!(rel_err(&vectors[0], &vectors[1]) > 1e-3);
    // Embedding one at a time gives the batch's vectors.
    let single = model.embed_images(vec![images[2].clone()]).await.unwrap();
    assert!(rel_err(&single[0], &vectors[2]) < 1e-5);

    let labels = vec!["chest x-ray".to_owned(), "fundus photograph".to_owned()];
    let scores = model
        .classify(images[0].clone(), labels.clone())
        .await
        .unwrap();
    assert_eq!(scores.len(), 2);
    assert!(
        scores
            .iter()
            .all(|s| s.probability > 0.0 && s.probability < 1.0)
    );

    // Bad input: named, nothing computed.
    let e = model.classify(images[0].clone(), vec![]).await.unwrap_err();
    assert_eq!(e.field(), Some("labels"));
    let e = model
        .classify(images[0].clone(), vec!["ok".into(), "  ".into()])
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("labels[1]"));
    let e = model
        .embed_images(vec![
            images[0].clone(),
            image(b"%PDF-1.4 not an image".to_vec(), None),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("images[1]"), "{e}");
    let mut truncated = shared_image("dicom/RG1_J2KI.dcm");
    truncated.truncate(4000);
    let e = model
        .embed_images(vec![image(truncated, Some("application/dicom"))])
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("images[0]"), "{e}");
    let e = model
        .embed_images(vec![image(
            shared_image("cxr/nih-cxr14-00000001_000.png"),
            Some("image/jpeg"),
        )])
        .await
        .unwrap_err();
    assert_eq!(
        e.field(),
        Some("images[0]"),
        "content type contradicting the bytes: {e}"
    );
    let e = model.embed_texts(vec![]).await.unwrap_err();
    assert_eq!(e.field(), Some("texts"));
}
