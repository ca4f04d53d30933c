//! Shared helpers for the model tests: where the real models and the llama.cpp reference are.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;

use serde::Deserialize;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `CHARTLINE_MODELS_DIR`, default `<workspace root>/models`. Panics (failing the test) when a
/// model is missing: a model test must never pass without its model.
pub fn model_path(relative: &str) -> PathBuf {
    let dir = std::env::var_os("CHARTLINE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models"));
    let path = dir.join(relative);
    assert!(
        path.exists(),
        "model file {} is missing: run scripts/install-models.sh (or set CHARTLINE_MODELS_DIR)",
        path.display()
    );
    path
}

/// The embedded default model.
pub fn gemma_path() -> PathBuf {
    model_path("gemma3-270m/gemma-3-270m-q4_k_m.gguf")
}

/// The default embedding model folder.
pub fn minilm_path() -> PathBuf {
    model_path("all-minilm-l6-v2")
}

/// What llama.cpp did with the same GGUF.
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub model_sha256: String,
    pub tokenization: Vec<TokenizationCase>,
    pub greedy: Vec<GreedyCase>,
}

#[derive(Debug, Deserialize)]
pub struct TokenizationCase {
    pub text: String,
    pub ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct GreedyCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
}

/// `../shared/fixtures/reference/gemma3-270m-llamacpp.json` from the workspace root.
pub fn reference() -> Reference {
    let path = workspace_root().join("../shared/fixtures/reference/gemma3-270m-llamacpp.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reference fixture {} unreadable: {e}", path.display()));
    serde_json::from_str(&text).expect("reference fixture parses")
}
