//! Text embeddings with a sentence-transformers BERT model (all-MiniLM-L6-v2 by default):
//! mean pooling over the attention mask, then L2 normalisation, as sentence-transformers
//! computes them. The model lives on its own thread like the generation engine.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use sha2::{Digest, Sha256};
use tokenizers::TruncationParams;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::identity::{BackendKind, ModelIdentity, sha256_file};

/// Texts per forward pass; larger requests are split.
pub const EMBED_BATCH: usize = 32;

struct EmbedJob {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

/// A text-embedding model on its own thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Embedder {
    jobs: mpsc::Sender<EmbedJob>,
    identity: ModelIdentity,
    dimension: usize,
}

impl Embedder {
    /// Loads a sentence-transformers BERT folder (`config.json`, `tokenizer.json`,
    /// `model.safetensors`, optionally `sentence_bert_config.json` for the token limit) and
    /// starts its thread. Blocking.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let model = MiniLm::load(dir.as_ref())?;
        let identity = model.identity.clone();
        let dimension = model.dimension;
        let (jobs, rx) = mpsc::channel::<EmbedJob>();
        std::thread::Builder::new()
            .name(format!("embed-{}", identity.name))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        model.embed(&job.texts)
                    }))
                    .unwrap_or_else(|_| {
                        Err(Error::Internal("the embedding model panicked".into()))
                    });
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the embedding thread: {e}")))?;
        Ok(Embedder {
            jobs,
            identity,
            dimension,
        })
    }

    /// Embeds `texts`: one L2-normalised vector of [`dimension`](Self::dimension) floats per
    /// text, in order. Texts longer than the model's token limit are truncated.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Err(Error::invalid("texts", "must not be empty"));
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(EmbedJob { texts, reply })
            .map_err(|_| Error::Unavailable("the embedding thread has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("the embedding thread dropped the request".into()))?
    }

    /// Length of each embedding (384 for MiniLM-L6).
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The model's identity (`backend` is `safetensors`).
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }
}

struct MiniLm {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    pad_id: u32,
    dimension: usize,
    identity: ModelIdentity,
    device: Device,
}

impl MiniLm {
    fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound(dir.to_path_buf()));
        }
        let file = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::NotFound(p))
            }
        };
        let config_path = file("config.json")?;
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: BertConfig = serde_json::from_str(&config_text)
            .map_err(|e| Error::InvalidModel(format!("{}: {e}", config_path.display())))?;

        // sentence-transformers truncates at max_seq_length (256 for MiniLM), never past
        // the position table.
        let max_tokens = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v.get("max_seq_length").and_then(serde_json::Value::as_u64))
            .map_or(config.max_position_embeddings, |n| n as usize)
            .min(config.max_position_embeddings);

        let tokenizer_path = file("tokenizer.json")?;
        let tokenizer_bytes =
            std::fs::read(&tokenizer_path).map_err(|e| Error::io(&tokenizer_path, e))?;
        let mut tokenizer =
            tokenizers::Tokenizer::from_bytes(&tokenizer_bytes).map_err(Error::tokenizer)?;
        // The file pads and truncates at 128; pad per batch instead and truncate at the
        // model's real limit.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(Error::tokenizer)?;
        let pad_id = tokenizer
            .token_to_id("[PAD]")
            .unwrap_or(config.pad_token_id as u32);

        let weights_path = file("model.safetensors")?;
        let weights = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)?;
        let model = BertModel::load(vb, &config)?;

        let name = dir.file_name().map_or_else(
            || "embedding-model".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let identity = ModelIdentity {
            name,
            backend: BackendKind::Safetensors,
            weights_sha256: sha256_file(&weights_path)?,
            tokenizer_sha256: hex::encode(Sha256::digest(&tokenizer_bytes)),
            context_length: max_tokens,
        };
        Ok(MiniLm {
            model,
            tokenizer,
            pad_id,
            dimension: config.hidden_size,
            identity,
            device,
        })
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(EMBED_BATCH) {
            out.extend(self.embed_batch(batch)?);
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let encodings = texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode_fast(t.as_str(), true)
                    .map_err(Error::tokenizer)
            })
            .collect::<Result<Vec<_>>>()?;
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(texts.len() * longest);
        let mut mask = Vec::with_capacity(texts.len() * longest);
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend(std::iter::repeat_n(1u32, e.len()));
            ids.extend(std::iter::repeat_n(self.pad_id, longest - e.len()));
            mask.extend(std::iter::repeat_n(0u32, longest - e.len()));
        }
        let shape = (texts.len(), longest);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?; // (B, T, H)
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (B, T, 1)
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // (B, H)
        let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?; // (B, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norms)?.to_vec2::<f32>()?)
    }
}
