//! Model execution for Chartline: text generation with Gemma 3, its tokenizer and chat
//! template, and text embeddings. The only crate in the workspace that knows candle; its
//! public API speaks in strings, token ids, [`GenerateParams`] and events.
//!
//! # Architecture
//!
//! - **Backends.** [`Backend`] is the one trait a generation backend implements: given a
//!   prompt, parameters and a [`TokenSink`], generate and report a [`Completion`]. The GGUF
//!   backend ([`gemma3::load_gguf`]) is a [`LocalBackend`] over Chartline's own Gemma 3
//!   ([`gemma3`]); a safetensors backend can reuse [`LocalBackend`] by implementing
//!   [`CausalLm`], and an OpenAI-compatible backend implements [`Backend`] directly.
//! - **Why our own Gemma 3.** candle-transformers' `quantized_gemma3` is not Gemma 3: SiLU in
//!   place of GELU-tanh, no sliding window while generating, no RoPE scaling, the wrong 27B
//!   query scale, a crash on chunked prefill, and 3.3 GB of RoPE tables and f32 embeddings
//!   for a 250 MB file. [`gemma3`] keeps candle's quantized kernels (`QMatMul`) but implements
//!   the architecture as llama.cpp does, keeps the tied Q8_0 embedding quantized for the
//!   output projection, rewrites Q5_0 weights losslessly as Q8_0 (which candle has SIMD
//!   kernels for), and sizes RoPE tables and KV caches to the context actually served.
//! - **Tokenizer.** [`Tokenizer`] loads without weights, so other crates
//!   (prompt budgeting) count tokens exactly as the model will. A `tokenizer.json` is used as
//!   is; a GGUF's SentencePiece vocabulary (scores, no merges) becomes a byte-fallback BPE
//!   whose merges are ranked by piece score, with control and user-defined tokens matched in
//!   the text — the rule llama.cpp applies, checked against its token ids in the tests.
//! - **Threading.** [`Engine`] moves a backend onto its own OS thread (the pattern of
//!   text-embeddings-inference's `backends` crate). Requests arrive over a channel and run one
//!   at a time; events go back over a per-request channel as a [`GenerationStream`]. Dropping
//!   the stream cancels the request at the next token (or the next prefill chunk). The async
//!   runtime never runs model code. [`Embedder`] does the same for embeddings. candle's CPU
//!   kernels use their own worker pool sized by `CANDLE_NUM_THREADS` (default: physical
//!   cores) whose threads spin while they wait: on a box where other work keeps the cores
//!   busy, decoding with 2 spinning threads on 2 cores was measured 5-10x slower than with
//!   `CANDLE_NUM_THREADS=1`, so give the model fewer threads than there are free cores.
//! - **Determinism.** Greedy decoding (`temperature == 0`) is bit-reproducible on one backend
//!   and machine; sampling uses a seeded generator defined in this crate, and the seed used is
//!   reported in the [`Completion`] for replay.
//! - **Errors.** One [`Error`] enum with a protocol-neutral [`ErrorCategory`]; request errors
//!   name the field and the limit. Errors never carry prompt or output text.

mod backend;
pub mod bench;
mod chat;
mod embed;
mod engine;
mod error;
pub mod gemma3;
mod generation;
pub mod grpc;
mod identity;
mod image_text;
mod images;
mod openai;
pub mod openai_server;
mod params;
mod sampling;
pub mod siglip;
mod tokenizer;

pub use backend::{
    Backend, Completion, FinishReason, GeneratedToken, GenerationEvent, GenerationRequest,
    ImageInput, TokenSink, Usage,
};
pub use chat::{ChatMessage, Role, chat_prompt};
pub use embed::{EMBED_BATCH, Embedder};
pub use engine::{Engine, GenerationStream};
pub use error::{Error, ErrorCategory, Result};
pub use gemma3::ImageSupport;
pub use gemma3::{GgufBackend, GgufOptions, load_gguf};
pub use gemma3::{SafetensorsBackend, SafetensorsDtype, SafetensorsOptions, load_safetensors};
pub use generation::{CausalLm, LocalBackend};
pub use identity::{BackendKind, ModelIdentity};
pub use image_text::{ImageTextEmbedder, LabelScore, MAX_LABELS, SiglipDualEncoder};
pub use openai::{
    OPENAI_API_KEY_ENV, OPENAI_SPEC_PREFIX, OpenAiBackend, OpenAiOptions, UNKNOWN_TOKEN_ID,
};
pub use params::{GenerateParams, MAX_STOP_SEQUENCE_BYTES, MAX_STOP_SEQUENCES};
pub use tokenizer::{SpecialTokens, Tokenizer, TokenizerSource};
