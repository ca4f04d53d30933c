//! MiniLM text embeddings.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use chartline_inference::{BackendKind, Embedder, ErrorCategory};

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn related_clinical_phrases_are_closer_than_unrelated_ones() {
    let embedder = Embedder::load(common::minilm_path()).expect("MiniLM loads");
    assert_eq!(embedder.dimension(), 384);
    assert_eq!(embedder.identity().backend, BackendKind::Safetensors);
    let v = embedder
        .embed(vec![
            "myocardial infarction".into(),
            "heart attack".into(),
            "broken wrist".into(),
        ])
        .await
        .expect("embeds");
    assert_eq!(v.len(), 3);
    for e in &v {
        assert_eq!(e.len(), 384);
        let norm = cos(e, e).sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "L2-normalised, got {norm}");
    }
    let related = cos(&v[0], &v[1]);
    let unrelated = cos(&v[0], &v[2]);
    println!("cos(MI, heart attack) = {related:.4}, cos(MI, broken wrist) = {unrelated:.4}");
    assert!(
        related > unrelated,
        "MI is closer to heart attack ({related}) than to broken wrist ({unrelated})"
    );
}

#[tokio::test]
async fn padding_to_the_batch_does_not_change_an_embedding() {
    let embedder = Embedder::load(common::minilm_path()).unwrap();
    let alone = embedder.embed(vec!["heart attack".into()]).await.unwrap();
    let long = "chronic kidney disease stage 3 with type 2 diabetes mellitus and hypertension, on metformin";
    let batched = embedder
        .embed(vec![long.into(), "heart attack".into()])
        .await
        .unwrap();
    let drift: f32 = alone[0]
        .iter()
        .zip(&batched[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        drift < 1e-4,
        "a short text padded in a batch embeds the same (max diff {drift})"
    );
}

#[tokio::test]
async fn more_than_one_batch_keeps_order_and_empty_input_is_refused() {
    let embedder = Embedder::load(common::minilm_path()).unwrap();
    let texts: Vec<String> = (0..40).map(|i| format!("note number {i}")).collect();
    let all = embedder.embed(texts.clone()).await.unwrap();
    assert_eq!(all.len(), 40);
    let last = embedder.embed(vec![texts[39].clone()]).await.unwrap();
    let drift: f32 = all[39]
        .iter()
        .zip(&last[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(drift < 1e-4, "the 40th text (second batch) is in place");
    let e = embedder.embed(Vec::new()).await.unwrap_err();
    assert_eq!(e.category(), ErrorCategory::InvalidArgument);
}
