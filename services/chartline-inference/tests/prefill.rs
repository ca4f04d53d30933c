//! Chunked prefill and the sliding window: however a long prompt is split into forward
//! passes, the model must compute the same thing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use chartline_inference::gemma3::Gemma3;
use chartline_inference::{Backend, GgufOptions, load_gguf};

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, x)| if *x > v[best] { i } else { best })
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// 600 prompt tokens: longer than the 512-token window of the local layers.
fn long_prompt(backend: &impl Backend) -> Vec<u32> {
    let sentence = "Patient seen in clinic for follow-up of type 2 diabetes, hypertension and stage 3 CKD; \
                    HbA1c 8.2%, eGFR 48, BP 142/91, on metformin, lisinopril and atorvastatin. ";
    let mut ids = backend
        .tokenizer()
        .unwrap()
        .encode(&sentence.repeat(30), true)
        .unwrap();
    ids.truncate(600);
    assert_eq!(ids.len(), 600);
    ids
}

/// Final logits of `ids` prefilled whole, in 96-token chunks, and 590 + one by one.
fn three_ways(model: &mut Gemma3, ids: &[u32]) -> [Vec<f32>; 3] {
    let whole = model.forward(ids, 0).unwrap();
    let mut chunked = Vec::new();
    let mut pos = 0;
    for chunk in ids.chunks(96) {
        chunked = model.forward(chunk, pos).unwrap();
        pos += chunk.len();
    }
    let mut stepwise = model.forward(&ids[..590], 0).unwrap();
    for (i, &t) in ids.iter().enumerate().skip(590) {
        stepwise = model.forward(&[t], i).unwrap();
    }
    [whole, chunked, stepwise]
}

#[test]
fn chunked_and_token_by_token_prefill_compute_the_same_past_the_sliding_window() {
    // With f32 weights every path runs the same arithmetic up to summation order, so this
    // checks the cache, masks and window exactly.
    let options = GgufOptions {
        context_length: Some(1024),
        dequantize_weights: true,
        ..Default::default()
    };
    let mut backend = load_gguf(common::gemma_path(), &options).expect("model loads");
    let ids = long_prompt(&backend);
    let [whole, chunked, stepwise] = three_ways(backend.model_mut(), &ids);
    let (d1, d2) = (max_diff(&whole, &chunked), max_diff(&whole, &stepwise));
    println!(
        "f32 weights, max |logit diff| vs one pass: 96-token chunks {d1:.1e}, token by token {d2:.1e}"
    );
    assert!(
        d1 < 1e-3 && d2 < 1e-3,
        "same logits however the prompt is split ({d1}, {d2})"
    );
}

#[test]
fn quantized_prefill_agrees_on_the_next_tokens_however_it_is_chunked() {
    // candle's quantized kernels pick different code paths by row count (tiles, tails), so
    // logits differ slightly between splits; the chosen tokens must not.
    let options = GgufOptions {
        context_length: Some(1024),
        ..Default::default()
    };
    let mut backend = load_gguf(common::gemma_path(), &options).expect("model loads");
    let ids = long_prompt(&backend);
    let model = backend.model_mut();
    let [whole, chunked, stepwise] = three_ways(model, &ids);
    println!(
        "quantized, max |logit diff| vs one pass: chunks {:.2}, token by token {:.2}",
        max_diff(&whole, &chunked),
        max_diff(&whole, &stepwise)
    );
    assert_eq!(
        argmax(&whole),
        argmax(&chunked),
        "same next token with 96-token chunks"
    );
    assert_eq!(
        argmax(&whole),
        argmax(&stepwise),
        "same next token token by token"
    );

    let continue_greedy = |model: &mut Gemma3, mut logits: Vec<f32>| {
        let mut out = Vec::new();
        for pos in 600..606 {
            let t = argmax(&logits) as u32;
            out.push(t);
            logits = model.forward(&[t], pos).unwrap();
        }
        out
    };
    let a = continue_greedy(model, stepwise);
    let whole_again = model.forward(&ids, 0).unwrap();
    let b = continue_greedy(model, whole_again);
    assert_eq!(
        a, b,
        "greedy continuation does not depend on how the prompt was chunked"
    );
}

#[test]
fn a_sequence_cannot_outgrow_the_prepared_positions() {
    let mut backend = load_gguf(
        common::gemma_path(),
        &GgufOptions {
            context_length: Some(16),
            ..Default::default()
        },
    )
    .expect("model loads");
    assert_eq!(backend.identity().context_length, 16);
    let model = backend.model_mut();
    assert!(
        model.forward(&[2; 16], 0).is_ok(),
        "exactly the context fits"
    );
    assert!(
        model.forward(&[2], 16).is_err(),
        "one more position is refused, not a panic"
    );
}
