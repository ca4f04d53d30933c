//! The safetensors backend on a tiny random-weight Gemma 3 checkpoint that the tests write:
//! real tensor names and config keys, two shards and an index, in both the text-only and the
//! multimodal (`language_model.`, `text_config`) layout. The logits are checked against an
//! independent, naive f64 implementation of Gemma 3 written here from the Hugging Face
//! definition (RMSNorm times `1 + w`, per-head q/k norms, rotate-half RoPE with local and
//! linearly scaled global bases, grouped-query attention with a sliding window, GELU-tanh MLP,
//! post-norms, tied output projection).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use chartline_inference::{
    Backend, BackendKind, Engine, GenerateParams, GenerationEvent, SafetensorsBackend,
    SafetensorsDtype, SafetensorsOptions, load_safetensors,
};
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

// The tiny model. Query width (HEADS * HEAD_DIM = 96) differs from HIDDEN and from FFN, and the
// query scale from the head width, so that a transposed matrix or a wrong scale cannot pass.
const VOCAB: usize = 48;
const HIDDEN: usize = 64;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 24;
const FFN: usize = 80;
/// Layer 2 is global; 0, 1 and 3 slide.
const PATTERN: usize = 3;
const WINDOW: usize = 4;
const ROPE_GLOBAL: f64 = 50_000.0;
const ROPE_FACTOR: f64 = 4.0;
const ROPE_LOCAL: f64 = 10_000.0;
const QUERY_SCALAR: f64 = 20.0;
const EPS: f64 = 1e-6;
const MAX_POSITIONS: usize = 128;

const EOS: u32 = 1;
const BOS: u32 = 2;
const END_OF_TURN: u32 = 5;

// ---------------------------------------------------------------------------------------
// The checkpoint
// ---------------------------------------------------------------------------------------

/// One weight: its name under the text model's root, shape, values (exactly representable in
/// bf16, as the file stores them) and the bf16 tensor written.
struct Weight {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
    tensor: Tensor,
}

struct Weights(Vec<Weight>);

impl Weights {
    fn get(&self, name: &str) -> &[f32] {
        &self
            .0
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no weight {name}"))
            .values
    }
}

/// SplitMix64: a fixed stream of numbers, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[-a, a]`.
    fn uniform(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| (self.next_f32() * 2.0 - 1.0) * a).collect()
    }
}

fn tiny_weights() -> Weights {
    let mut rng = Rng(0x00C0_FFEE);
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, a: f32| {
        let n = shape.iter().product();
        let t = Tensor::from_vec(rng.uniform(n, a), shape.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let values = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        out.push(Weight {
            name,
            shape,
            values,
            tensor: t,
        });
    };
    // Unit-variance outputs for unit-variance inputs.
    let proj = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    // Norm weights far from 0, so that forgetting Gemma's `1 +` changes everything.
    let norm = 0.5;
    add("embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 0.05);
    for l in 0..LAYERS {
        let p = |n: &str| format!("layers.{l}.{n}");
        add(p("input_layernorm.weight"), vec![HIDDEN], norm);
        add(
            p("self_attn.q_proj.weight"),
            vec![HEADS * HEAD_DIM, HIDDEN],
            proj(HIDDEN),
        );
        add(
            p("self_attn.k_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            proj(HIDDEN),
        );
        add(
            p("self_attn.v_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            proj(HIDDEN),
        );
        add(
            p("self_attn.o_proj.weight"),
            vec![HIDDEN, HEADS * HEAD_DIM],
            proj(HEADS * HEAD_DIM),
        );
        add(p("self_attn.q_norm.weight"), vec![HEAD_DIM], norm);
        add(p("self_attn.k_norm.weight"), vec![HEAD_DIM], norm);
        add(p("post_attention_layernorm.weight"), vec![HIDDEN], norm);
        add(p("pre_feedforward_layernorm.weight"), vec![HIDDEN], norm);
        add(p("mlp.gate_proj.weight"), vec![FFN, HIDDEN], proj(HIDDEN));
        add(p("mlp.up_proj.weight"), vec![FFN, HIDDEN], proj(HIDDEN));
        add(p("mlp.down_proj.weight"), vec![HIDDEN, FFN], proj(FFN));
        add(p("post_feedforward_layernorm.weight"), vec![HIDDEN], norm);
    }
    add("norm.weight".into(), vec![HIDDEN], norm);
    Weights(out)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// `Gemma3ForCausalLM`: `model.…`, keys at the top of `config.json`.
    Text,
    /// `Gemma3ForConditionalGeneration`: `language_model.model.…`, keys under `text_config`,
    /// plus a partial vision tower that the language-model tests skip (`text_only`).
    Multimodal,
}

fn text_config(layout: Layout) -> Value {
    let mut c = json!({
        "model_type": "gemma3_text",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": EPS,
        "rope_theta": ROPE_GLOBAL,
        "rope_scaling": {"rope_type": "linear", "factor": ROPE_FACTOR},
        "sliding_window": WINDOW,
        "query_pre_attn_scalar": QUERY_SCALAR,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": null,
        "attn_logit_softcapping": null,
        "attention_bias": false,
        "vocab_size": VOCAB,
    });
    // The two layouts state the same model two ways: the old integer pattern and explicit
    // local base, or the newer per-layer list and the default local base.
    if layout == Layout::Text {
        c["sliding_window_pattern"] = json!(PATTERN);
        c["rope_local_base_freq"] = json!(ROPE_LOCAL);
        c["tie_word_embeddings"] = json!(true);
    } else {
        let types: Vec<&str> = (0..LAYERS)
            .map(|i| {
                if (i + 1) % PATTERN == 0 {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
            })
            .collect();
        c["layer_types"] = json!(types);
    }
    c
}

fn config(layout: Layout) -> Value {
    match layout {
        Layout::Text => {
            let mut c = text_config(layout);
            c["architectures"] = json!(["Gemma3ForCausalLM"]);
            c
        }
        Layout::Multimodal => json!({
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": text_config(layout),
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16},
            "mm_tokens_per_image": 4,
            "image_token_index": 47,
        }),
    }
}

fn tokenizer_json() -> Value {
    let specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ];
    let words = [
        "the",
        "patient",
        "has",
        "a",
        "fever",
        "and",
        "cough",
        "no",
        "chest",
        "pain",
        "blood",
        "pressure",
        "is",
        "high",
        "low",
        "heart",
        "rate",
        "normal",
        "on",
        "metformin",
        "for",
        "diabetes",
        "type",
        "two",
        "kidney",
        "function",
        "stable",
        "follow",
        "up",
        "in",
        "weeks",
        "user",
        "model",
        "what",
        "dose",
        "daily",
        "mg",
        "of",
        "insulin",
        "glucose",
        "today",
        ".",
    ];
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().chain(words.iter()).enumerate() {
        vocab.insert((*t).to_owned(), json!(i));
    }
    assert_eq!(vocab.len(), VOCAB);
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    })
}

/// A checkpoint folder under the temp dir, removed on drop.
struct Checkpoint {
    dir: PathBuf,
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// How a checkpoint departs from the plain sharded, tied one: equivalent variants, or damage.
#[derive(Default)]
struct Variant {
    /// One `model.safetensors` and no index.
    single_file: bool,
    /// `tie_word_embeddings: false` with an explicit output projection (equal to the
    /// embedding, so the model computes the same).
    untied_head: bool,
    /// Config key to delete (`text_config.` keys for the multimodal layout).
    drop_config_key: Option<&'static str>,
    /// Weight (name under the text root) to leave out of the files and the index.
    drop_tensor: Option<&'static str>,
    /// Weight to leave out of the files while the index still lists it.
    drop_tensor_keep_index: Option<&'static str>,
    /// Weight to write with one more row than it should have.
    grow_tensor: Option<&'static str>,
}

fn write_checkpoint(tag: &str, layout: Layout, weights: &Weights, variant: &Variant) -> Checkpoint {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "chartline-safetensors-{}-{tag}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let checkpoint = Checkpoint { dir: dir.clone() };

    let mut config = config(layout);
    if let Some(key) = variant.drop_config_key {
        let obj = match key.strip_prefix("text_config.") {
            Some(k) => (config["text_config"].as_object_mut().unwrap(), k),
            None => (config.as_object_mut().unwrap(), key),
        };
        assert!(obj.0.remove(obj.1).is_some(), "config has {key}");
    }
    if variant.untied_head {
        let text = match layout {
            Layout::Text => &mut config,
            Layout::Multimodal => &mut config["text_config"],
        };
        text["tie_word_embeddings"] = json!(false);
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tokenizer_json()).unwrap(),
    )
    .unwrap();

    let prefix = match layout {
        Layout::Text => "model.",
        Layout::Multimodal => "language_model.model.",
    };
    let mut shards: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    let mut weight_map = serde_json::Map::new();
    for w in &weights.0 {
        if variant.drop_tensor == Some(w.name.as_str()) {
            continue;
        }
        // Embedding and layers 0-1 in the first file, the rest in the second.
        let second = w.name.starts_with("layers.2.")
            || w.name.starts_with("layers.3.")
            || w.name == "norm.weight";
        let shard = usize::from(second);
        let name = format!("{prefix}{}", w.name);
        weight_map.insert(name.clone(), json!(SHARDS[shard]));
        if variant.drop_tensor_keep_index == Some(w.name.as_str()) {
            continue;
        }
        let tensor = if variant.grow_tensor == Some(w.name.as_str()) {
            let mut shape = w.shape.clone();
            shape[0] += 1;
            Tensor::zeros(shape.as_slice(), DType::BF16, &Device::Cpu).unwrap()
        } else {
            w.tensor.clone()
        };
        shards[shard].insert(name, tensor);
    }
    if layout == Layout::Multimodal {
        // Vision tower and projector: present, never read.
        for (name, shape) in [
            (
                "vision_tower.vision_model.embeddings.patch_embedding.weight",
                vec![16, 3, 4, 4],
            ),
            (
                "multi_modal_projector.mm_input_projection_weight",
                vec![16, HIDDEN],
            ),
        ] {
            let t = Tensor::ones(shape.as_slice(), DType::BF16, &Device::Cpu).unwrap();
            weight_map.insert(name.to_owned(), json!(SHARDS[0]));
            shards[0].insert(name.to_owned(), t);
        }
    }
    if variant.untied_head {
        let name = match layout {
            Layout::Text => "lm_head.weight",
            Layout::Multimodal => "language_model.lm_head.weight",
        };
        let embed = &weights.0[0];
        assert_eq!(embed.name, "embed_tokens.weight");
        weight_map.insert(name.to_owned(), json!(SHARDS[1]));
        shards[1].insert(name.to_owned(), embed.tensor.clone());
    }
    if variant.single_file {
        let [mut all, rest] = shards;
        all.extend(rest);
        candle_core::safetensors::save(&all, dir.join("model.safetensors")).unwrap();
        return checkpoint;
    }
    for (file, tensors) in SHARDS.iter().zip(&shards) {
        candle_core::safetensors::save(tensors, dir.join(file)).unwrap();
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    checkpoint
}

/// These checkpoints test the language model: a multimodal layout's (partial) vision tower
/// is skipped (`text_only`); the vision side has its own tests against `transformers`.
fn options(dtype: SafetensorsDtype) -> SafetensorsOptions {
    SafetensorsOptions {
        dtype,
        text_only: true,
        ..Default::default()
    }
}

fn load(checkpoint: &Checkpoint, dtype: SafetensorsDtype) -> SafetensorsBackend {
    load_safetensors(&checkpoint.dir, &options(dtype)).expect("the tiny checkpoint loads")
}

fn load_error(checkpoint: &Checkpoint) -> String {
    match load_safetensors(&checkpoint.dir, &options(SafetensorsDtype::F32)) {
        Ok(_) => panic!("a variantd checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// The independent reference: Gemma 3 in plain f64, one position at a time
// ---------------------------------------------------------------------------------------

fn dot(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum()
}

/// Hugging Face `Gemma3RMSNorm`: `x / sqrt(mean(x²) + eps) * (1 + w)`.
fn rms_norm(x: &[f64], w: &[f32]) -> Vec<f64> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (mean_sq + EPS).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, w)| v * r * (1.0 + f64::from(*w)))
        .collect()
}

/// `W x` for a `(out, in)` row-major weight.
fn linear(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|row| dot(row, x)).collect()
}

/// `rotate_half` RoPE on one head: pairs `(i, i + d/2)`, frequency `base^(-2i/d) / scale`.
fn rope(x: &mut [f64], pos: usize, base: f64, scale: f64) {
    let half = x.len() / 2;
    for i in 0..half {
        let freq = base.powf(-2.0 * i as f64 / x.len() as f64) / scale;
        let (sin, cos) = (pos as f64 * freq).sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

/// `gelu_pytorch_tanh`.
fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// Logits at every position of `tokens`.
fn reference_logits(w: &Weights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let embed = w.get("embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            let row = &embed[t as usize * HIDDEN..(t as usize + 1) * HIDDEN];
            row.iter()
                .map(|v| f64::from(*v) * (HIDDEN as f64).sqrt())
                .collect()
        })
        .collect();
    for l in 0..LAYERS {
        let p = |n: &str| format!("layers.{l}.{n}");
        let global = (l + 1) % PATTERN == 0;
        let (base, scale, window) = if global {
            (ROPE_GLOBAL, ROPE_FACTOR, None)
        } else {
            (ROPE_LOCAL, 1.0, Some(WINDOW))
        };
        // Queries, keys and values of every position, per head.
        let mut qs: Vec<Vec<Vec<f64>>> = Vec::new();
        let mut ks: Vec<Vec<Vec<f64>>> = Vec::new();
        let mut vs: Vec<Vec<Vec<f64>>> = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let h = rms_norm(x, w.get(&p("input_layernorm.weight")));
            let heads = |m: Vec<f64>, norm: Option<&str>| -> Vec<Vec<f64>> {
                m.chunks_exact(HEAD_DIM)
                    .map(|head| match norm {
                        Some(n) => {
                            let mut head = rms_norm(head, w.get(&p(n)));
                            rope(&mut head, pos, base, scale);
                            head
                        }
                        None => head.to_vec(),
                    })
                    .collect()
            };
            qs.push(heads(
                linear(w.get(&p("self_attn.q_proj.weight")), &h),
                Some("self_attn.q_norm.weight"),
            ));
            ks.push(heads(
                linear(w.get(&p("self_attn.k_proj.weight")), &h),
                Some("self_attn.k_norm.weight"),
            ));
            vs.push(heads(
                linear(w.get(&p("self_attn.v_proj.weight")), &h),
                None,
            ));
        }
        for pos in 0..xs.len() {
            let mut attn = Vec::with_capacity(HEADS * HEAD_DIM);
            for (head, q) in qs[pos].iter().enumerate() {
                let kv = head / (HEADS / KV_HEADS);
                let visible: Vec<usize> = (0..=pos)
                    .filter(|s| window.is_none_or(|w| pos - s < w))
                    .collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&s| {
                        q.iter().zip(&ks[s][kv]).map(|(a, b)| a * b).sum::<f64>()
                            / QUERY_SCALAR.sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exp.iter().sum();
                let mut out = vec![0.0; HEAD_DIM];
                for (&s, e) in visible.iter().zip(&exp) {
                    for (o, v) in out.iter_mut().zip(&vs[s][kv]) {
                        *o += e / total * v;
                    }
                }
                attn.extend(out);
            }
            let o = linear(w.get(&p("self_attn.o_proj.weight")), &attn);
            let o = rms_norm(&o, w.get(&p("post_attention_layernorm.weight")));
            let h: Vec<f64> = xs[pos].iter().zip(&o).map(|(a, b)| a + b).collect();
            let f = rms_norm(&h, w.get(&p("pre_feedforward_layernorm.weight")));
            let gate = linear(w.get(&p("mlp.gate_proj.weight")), &f);
            let up = linear(w.get(&p("mlp.up_proj.weight")), &f);
            let m: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| gelu_tanh(*g) * u)
                .collect();
            let d = linear(w.get(&p("mlp.down_proj.weight")), &m);
            let d = rms_norm(&d, w.get(&p("post_feedforward_layernorm.weight")));
            xs[pos] = h.iter().zip(&d).map(|(a, b)| a + b).collect();
        }
    }
    xs.iter()
        .map(|x| linear(embed, &rms_norm(x, w.get("norm.weight"))))
        .collect()
}

fn argmax<T: PartialOrd + Copy>(v: &[T]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, x)| if *x > v[best] { i } else { best })
}

/// `max |a - b| / max |b|`.
fn relative_error(a: &[f32], b: &[f64]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max);
    diff / b.iter().map(|y| y.abs()).fold(0.0, f64::max)
}

/// A fixed 40-token sequence starting with BOS: ten times the window, so local layers drop
/// keys while prefilling and while decoding.
fn sequence() -> Vec<u32> {
    let mut rng = Rng(7);
    std::iter::once(BOS)
        .chain((0..39).map(|_| 6 + (rng.next_f32() * (VOCAB - 6) as f32) as u32))
        .collect()
}

/// The model's logits at every position of `ids`: a 13-token prefill in chunks of 5, then one
/// token at a time.
fn model_logits(backend: &mut SafetensorsBackend, ids: &[u32]) -> Vec<Vec<f32>> {
    let model = backend.model_mut();
    let mut out = Vec::new();
    let mut pos = 0;
    for chunk in ids[..13].chunks(5) {
        let logits = model.forward(chunk, pos).unwrap();
        pos += chunk.len();
        out.resize(pos - 1, Vec::new());
        out.push(logits);
    }
    for (i, &t) in ids.iter().enumerate().skip(13) {
        out.push(model.forward(&[t], i).unwrap());
    }
    out
}

/// Greedy ids for `prompt`, generated through the engine (which drives the backend's decode
/// loop on its own thread).
fn greedy(engine: &Engine, prompt: &str, max_tokens: u32) -> Vec<u32> {
    futures::executor::block_on(async {
        let mut stream = engine.generate(prompt, GenerateParams::greedy(max_tokens));
        let mut ids = Vec::new();
        while let Some(event) = stream.next().await {
            match event.expect("generation succeeds") {
                GenerationEvent::Token(t) => ids.push(t.id),
                GenerationEvent::Finished(_) => break,
            }
        }
        ids
    })
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn logits_match_an_independent_implementation_in_both_layouts() {
    let weights = tiny_weights();
    let ids = sequence();
    let reference = reference_logits(&weights, &ids);
    for layout in [Layout::Text, Layout::Multimodal] {
        let checkpoint = write_checkpoint("reference", layout, &weights, &Variant::default());
        let mut backend = load(&checkpoint, SafetensorsDtype::F32);
        let logits = model_logits(&mut backend, &ids);
        let mut worst: f64 = 0.0;
        let mut compared = 0;
        for (pos, (got, want)) in logits.iter().zip(&reference).enumerate() {
            if got.is_empty() {
                continue; // inside a prefill chunk: only its last position's logits exist
            }
            let err = relative_error(got, want);
            assert!(
                err < 1e-4,
                "{layout:?} position {pos}: relative error {err:e} against the reference"
            );
            assert_eq!(argmax(got), argmax(want), "{layout:?} position {pos}");
            worst = worst.max(err);
            compared += 1;
        }
        assert_eq!(compared, 3 + (ids.len() - 13));
        eprintln!("{layout:?}: {compared} positions, worst relative error {worst:e}");
    }
}

#[test]
fn loads_and_greedy_generation_is_deterministic_and_matches_the_reference() {
    let weights = tiny_weights();
    let checkpoint = write_checkpoint("greedy", Layout::Text, &weights, &Variant::default());
    let engine = Engine::load_safetensors(&checkpoint.dir, &options(SafetensorsDtype::F32))
        .expect("the engine loads the checkpoint");

    let prompt = "the patient has a fever and cough";
    let first = greedy(&engine, prompt, 20);
    let second = greedy(&engine, prompt, 20);
    assert!(!first.is_empty());
    assert_eq!(first, second, "greedy decoding is deterministic");

    // The reference's own greedy continuation of the same prompt ids.
    let mut ids = engine.tokenizer().unwrap().encode(prompt, true).unwrap();
    assert_eq!(ids[0], BOS);
    let prompt_len = ids.len();
    while ids.len() - prompt_len < 20 {
        let logits = reference_logits(&weights, &ids);
        let next = argmax(logits.last().unwrap()) as u32;
        ids.push(next);
        if next == EOS || next == END_OF_TURN {
            break;
        }
    }
    assert_eq!(
        first,
        ids[prompt_len..],
        "greedy tokens equal the reference's"
    );
    eprintln!("greedy: {} tokens {first:?}", first.len());

    // Identity: backend, context served, and the documented hashes.
    let identity = engine.identity();
    assert_eq!(identity.backend, BackendKind::Safetensors);
    assert_eq!(identity.context_length, MAX_POSITIONS);
    let mut weights_hash = Sha256::new();
    for shard in SHARDS {
        weights_hash.update(std::fs::read(checkpoint.dir.join(shard)).unwrap());
    }
    assert_eq!(
        identity.weights_sha256,
        hex::encode(weights_hash.finalize())
    );
    let tokenizer_bytes = std::fs::read(checkpoint.dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        identity.tokenizer_sha256,
        hex::encode(Sha256::digest(&tokenizer_bytes))
    );
    assert!(identity.name.starts_with("chartline-safetensors-"));
}

#[test]
fn both_layouts_give_identical_logits() {
    let weights = tiny_weights();
    let ids = sequence();
    for dtype in [SafetensorsDtype::F32, SafetensorsDtype::Bf16] {
        let text = write_checkpoint("text", Layout::Text, &weights, &Variant::default());
        let multimodal = write_checkpoint(
            "multimodal",
            Layout::Multimodal,
            &weights,
            &Variant::default(),
        );
        let a = model_logits(&mut load(&text, dtype), &ids);
        let b = model_logits(&mut load(&multimodal, dtype), &ids);
        assert_eq!(a, b, "{dtype}: the layouts compute the same model");
    }
}

#[test]
fn a_single_file_and_an_untied_head_load_the_same_model() {
    let weights = tiny_weights();
    let ids = sequence();
    let sharded = write_checkpoint("sharded", Layout::Text, &weights, &Variant::default());
    let want = model_logits(&mut load(&sharded, SafetensorsDtype::F32), &ids);
    for (layout, variant) in [
        (
            Layout::Text,
            Variant {
                single_file: true,
                ..Default::default()
            },
        ),
        (
            Layout::Text,
            Variant {
                untied_head: true,
                ..Default::default()
            },
        ),
        (
            Layout::Multimodal,
            Variant {
                single_file: true,
                untied_head: true,
                ..Default::default()
            },
        ),
    ] {
        let checkpoint = write_checkpoint("variant", layout, &weights, &variant);
        let mut backend = load(&checkpoint, SafetensorsDtype::F32);
        assert_eq!(model_logits(&mut backend, &ids), want, "{layout:?}");
        if variant.single_file {
            // One file: its ordinary sha256.
            let bytes = std::fs::read(checkpoint.dir.join("model.safetensors")).unwrap();
            assert_eq!(
                backend.identity().weights_sha256,
                hex::encode(Sha256::digest(&bytes))
            );
        }
    }
}

#[test]
fn bf16_agrees_with_f32_on_the_argmax() {
    let weights = tiny_weights();
    let ids = sequence();
    let checkpoint = write_checkpoint("bf16", Layout::Text, &weights, &Variant::default());
    let f32_logits = model_logits(&mut load(&checkpoint, SafetensorsDtype::F32), &ids);
    let bf16_logits = model_logits(&mut load(&checkpoint, SafetensorsDtype::Bf16), &ids);
    let spread = f32_logits
        .iter()
        .flatten()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    let (mut worst, mut same_argmax, mut compared) = (0.0f32, 0, 0);
    for (a, b) in f32_logits.iter().zip(&bf16_logits) {
        if a.is_empty() {
            continue;
        }
        compared += 1;
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        worst = worst.max(diff);
        let (ia, ib) = (argmax(a), argmax(b));
        if ia == ib {
            same_argmax += 1;
        } else {
            // A different choice only between near-equal candidates.
            assert!(
                a[ia] - a[ib] < 0.02 * spread,
                "bf16 picked {ib}, f32 {ia}: {a:?}"
            );
        }
    }
    eprintln!(
        "bf16 vs f32: same argmax at {same_argmax}/{compared} positions, \
         worst logit difference {worst} (largest |logit| {spread})"
    );
    assert!(worst < 0.05 * spread, "bf16 logits stay close to f32");
    assert!(same_argmax * 10 >= compared * 9);
}

#[test]
fn engine_serves_a_safetensors_checkpoint() {
    let weights = tiny_weights();
    let checkpoint = write_checkpoint("engine", Layout::Multimodal, &weights, &Variant::default());
    let engine = Engine::load_safetensors(&checkpoint.dir, &options(SafetensorsDtype::Bf16))
        .expect("the engine loads the checkpoint");
    assert_eq!(engine.identity().backend, BackendKind::Safetensors);
    assert_eq!(
        engine
            .tokenizer()
            .and_then(|t| t.special_tokens().end_of_turn),
        Some(END_OF_TURN)
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let weights = tiny_weights();
    let gone = write_checkpoint(
        "missing",
        Layout::Text,
        &weights,
        &Variant {
            drop_tensor: Some("layers.1.mlp.up_proj.weight"),
            ..Default::default()
        },
    );
    let err = load_error(&gone);
    assert!(
        err.contains("lacks tensor model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );

    let unlisted = write_checkpoint(
        "missing-in-file",
        Layout::Multimodal,
        &weights,
        &Variant {
            drop_tensor_keep_index: Some("layers.3.self_attn.k_norm.weight"),
            ..Default::default()
        },
    );
    let err = load_error(&unlisted);
    assert!(
        err.contains("lacks tensor language_model.model.layers.3.self_attn.k_norm.weight")
            && err.contains(SHARDS[1]),
        "{err}"
    );
}

#[test]
fn a_wrong_shape_is_named() {
    let weights = tiny_weights();
    let checkpoint = write_checkpoint(
        "shape",
        Layout::Text,
        &weights,
        &Variant {
            grow_tensor: Some("layers.0.self_attn.k_proj.weight"),
            ..Default::default()
        },
    );
    let err = load_error(&checkpoint);
    assert!(
        err.contains("tensor model.layers.0.self_attn.k_proj.weight")
            && err.contains(&format!("[{}, {HIDDEN}]", KV_HEADS * HEAD_DIM + 1))
            && err.contains(&format!("expected [{}, {HIDDEN}]", KV_HEADS * HEAD_DIM)),
        "{err}"
    );
}

#[test]
fn a_missing_config_key_is_named() {
    let weights = tiny_weights();
    let text = write_checkpoint(
        "config",
        Layout::Text,
        &weights,
        &Variant {
            drop_config_key: Some("num_hidden_layers"),
            ..Default::default()
        },
    );
    let err = load_error(&text);
    assert!(
        err.contains("num_hidden_layers is required but missing"),
        "{err}"
    );

    let multimodal = write_checkpoint(
        "config-mm",
        Layout::Multimodal,
        &weights,
        &Variant {
            drop_config_key: Some("text_config.intermediate_size"),
            ..Default::default()
        },
    );
    let err = load_error(&multimodal);
    assert!(
        err.contains("text_config.intermediate_size is required but missing"),
        "{err}"
    );
}

#[test]
fn a_missing_folder_or_tokenizer_is_not_found() {
    let missing = std::env::temp_dir().join("chartline-safetensors-no-such-folder");
    let err = load_safetensors(&missing, &SafetensorsOptions::default())
        .err()
        .expect("no folder, no model");
    assert_eq!(err.category(), chartline_inference::ErrorCategory::NotFound);

    let weights = tiny_weights();
    let checkpoint = write_checkpoint("no-tokenizer", Layout::Text, &weights, &Variant::default());
    std::fs::remove_file(checkpoint.dir.join("tokenizer.json")).unwrap();
    let err = load_safetensors(&checkpoint.dir, &SafetensorsOptions::default())
        .err()
        .expect("no tokenizer, no model");
    assert_eq!(err.category(), chartline_inference::ErrorCategory::NotFound);
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn a_partial_vision_tower_is_refused_by_name_unless_text_only() {
    let weights = tiny_weights();
    let checkpoint = write_checkpoint(
        "partial-vision",
        Layout::Multimodal,
        &weights,
        &Variant::default(),
    );
    let full = SafetensorsOptions {
        dtype: SafetensorsDtype::F32,
        ..Default::default()
    };
    let err = match load_safetensors(&checkpoint.dir, &full) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a checkpoint with half a vision tower must not load whole"),
    };
    assert!(err.contains("vision_config."), "names the missing key: {err}");
    assert!(load_safetensors(&checkpoint.dir, &options(SafetensorsDtype::F32)).is_ok());
}
