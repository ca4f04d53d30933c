//! Gemma 3 text hyper-parameters, read from GGUF metadata.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::error::{Error, Result};

/// RoPE base of the sliding-window (local) layers. Not in the GGUF; fixed by the architecture
/// (llama.cpp hard-codes it too).
pub const LOCAL_ROPE_BASE: f32 = 10_000.0;
/// Every this-many-th layer is global; the others use the sliding window. Gemma 3's pattern
/// (llama.cpp: `set_swa_pattern(6)`), unless the file says otherwise.
pub const DEFAULT_SLIDING_WINDOW_PATTERN: usize = 6;
/// Layer count of Gemma 3 27B, whose query scale differs (see [`Gemma3Config::query_pre_attn_scalar`]).
const LAYERS_27B: usize = 62;

/// Gemma 3 text-model hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3Config {
    /// Width of the residual stream (`embedding_length`).
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Query/key head width (`attention.key_length`).
    pub head_dim: usize,
    /// Value head width (`attention.value_length`).
    pub value_dim: usize,
    /// Width of the gated MLP.
    pub ffn_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Context length the model was trained for.
    pub trained_context_length: usize,
    /// Sliding-window size of the local layers; `None` makes every layer global.
    pub sliding_window: Option<usize>,
    /// Layer `i` is global when `(i + 1) % sliding_window_pattern == 0`.
    pub sliding_window_pattern: usize,
    /// RoPE base of the global layers (`rope.freq_base`).
    pub rope_base_global: f32,
    /// RoPE base of the local layers.
    pub rope_base_local: f32,
    /// Linear RoPE scaling factor of the global layers (`rope.scaling.factor`; 8 for
    /// MedGemma 4B/27B, 1 when absent). Local layers are never scaled.
    pub rope_scale_global: f32,
    /// Queries are multiplied by `1 / sqrt(query_pre_attn_scalar)`: the head width for 270M,
    /// 1B, 4B and 12B, `hidden_size / n_heads` for 27B (as in Gemma's reference code).
    pub query_pre_attn_scalar: f64,
    /// Final logit soft-capping (absent in Gemma 3).
    pub final_logit_softcapping: Option<f64>,
    /// Vocabulary size (rows of the token embedding).
    pub vocab_size: usize,
}

impl Gemma3Config {
    /// Whether layer `i` attends globally (otherwise within the sliding window).
    pub fn is_global(&self, layer: usize) -> bool {
        self.sliding_window.is_none() || (layer + 1).is_multiple_of(self.sliding_window_pattern)
    }

    /// Number of query heads sharing one key/value head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Reads the hyper-parameters of a `gemma3` GGUF. `vocab_size` comes from the embedding
    /// tensor; `query_pre_attn_scalar` overrides the architecture default when given.
    pub(crate) fn from_gguf(
        md: &HashMap<String, Value>,
        vocab_size: usize,
        query_pre_attn_scalar: Option<f64>,
    ) -> Result<Self> {
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| Error::InvalidModel("GGUF lacks general.architecture".into()))?;
        if arch != "gemma3" {
            return Err(Error::InvalidModel(format!(
                "architecture {arch:?} is not supported by the Gemma 3 GGUF backend"
            )));
        }
        let key = |k: &str| format!("gemma3.{k}");
        let req_u32 = |k: &str| -> Result<usize> {
            let full = key(k);
            md.get(&full)
                .ok_or_else(|| Error::InvalidModel(format!("GGUF lacks {full}")))?
                .to_u32()
                .map(|v| v as usize)
                .map_err(|e| Error::InvalidModel(format!("{full}: {e}")))
        };
        let opt_u32 = |k: &str| {
            md.get(&key(k))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
        };
        let opt_f32 = |k: &str| md.get(&key(k)).and_then(|v| v.to_f32().ok());

        let hidden_size = req_u32("embedding_length")?;
        let n_layers = req_u32("block_count")?;
        let n_heads = req_u32("attention.head_count")?;
        let n_kv_heads = opt_u32("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = opt_u32("attention.key_length").unwrap_or(hidden_size / n_heads.max(1));
        let value_dim = opt_u32("attention.value_length").unwrap_or(head_dim);
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::InvalidModel(format!(
                "{n_heads} query heads cannot be grouped over {n_kv_heads} key/value heads"
            )));
        }
        let rope_scale_global = match md
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
        {
            Some(t) if t != "linear" && t != "none" => {
                return Err(Error::InvalidModel(format!(
                    "RoPE scaling {t:?} is not supported (only linear)"
                )));
            }
            Some(t) if t == "none" => 1.0,
            _ => opt_f32("rope.scaling.factor")
                .filter(|f| *f > 0.0)
                .unwrap_or(1.0),
        };
        let query_pre_attn_scalar = query_pre_attn_scalar
            .or_else(|| opt_f32("attention.query_pre_attn_scalar").map(f64::from))
            .unwrap_or(if n_layers == LAYERS_27B {
                (hidden_size / n_heads) as f64
            } else {
                head_dim as f64
            });

        Ok(Gemma3Config {
            hidden_size,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            value_dim,
            ffn_dim: req_u32("feed_forward_length")?,
            rms_eps: f64::from(opt_f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-6)),
            trained_context_length: opt_u32("context_length").unwrap_or(8192),
            sliding_window: opt_u32("attention.sliding_window").filter(|w| *w > 0),
            sliding_window_pattern: opt_u32("attention.sliding_window_pattern")
                .filter(|p| *p > 0)
                .unwrap_or(DEFAULT_SLIDING_WINDOW_PATTERN),
            rope_base_global: opt_f32("rope.freq_base").unwrap_or(1_000_000.0),
            rope_base_local: LOCAL_ROPE_BASE,
            rope_scale_global,
            query_pre_attn_scalar,
            final_logit_softcapping: opt_f32("final_logit_softcapping")
                .filter(|c| *c > 0.0)
                .map(f64::from),
            vocab_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(extra: &[(&str, Value)]) -> HashMap<String, Value> {
        let mut m: HashMap<String, Value> = [
            ("general.architecture", Value::String("gemma3".into())),
            ("gemma3.embedding_length", Value::U32(640)),
            ("gemma3.block_count", Value::U32(18)),
            ("gemma3.attention.head_count", Value::U32(4)),
            ("gemma3.attention.head_count_kv", Value::U32(1)),
            ("gemma3.attention.key_length", Value::U32(256)),
            ("gemma3.feed_forward_length", Value::U32(2048)),
            ("gemma3.attention.sliding_window", Value::U32(512)),
            ("gemma3.rope.freq_base", Value::F32(1e6)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            m.insert((*k).to_owned(), v.clone());
        }
        m
    }

    #[test]
    fn every_sixth_layer_is_global() {
        let c = Gemma3Config::from_gguf(&md(&[]), 1000, None).ok();
        let globals: Vec<usize> = c
            .map(|c| (0..18).filter(|&i| c.is_global(i)).collect())
            .unwrap_or_default();
        assert_eq!(globals, vec![5, 11, 17]);
    }

    #[test]
    fn query_scale_is_head_width_except_for_27b() {
        let c = Gemma3Config::from_gguf(&md(&[]), 1000, None).ok();
        assert_eq!(c.map(|c| c.query_pre_attn_scalar), Some(256.0));
        let big = md(&[
            ("gemma3.block_count", Value::U32(62)),
            ("gemma3.embedding_length", Value::U32(5376)),
            ("gemma3.attention.head_count", Value::U32(32)),
            ("gemma3.attention.head_count_kv", Value::U32(16)),
            ("gemma3.attention.key_length", Value::U32(128)),
        ]);
        let c = Gemma3Config::from_gguf(&big, 1000, None).ok();
        assert_eq!(c.map(|c| c.query_pre_attn_scalar), Some(168.0));
    }

    #[test]
    fn linear_rope_scaling_is_read_and_other_kinds_refused() {
        let scaled = md(&[
            ("gemma3.rope.scaling.type", Value::String("linear".into())),
            ("gemma3.rope.scaling.factor", Value::F32(8.0)),
        ]);
        assert_eq!(
            Gemma3Config::from_gguf(&scaled, 1000, None)
                .ok()
                .map(|c| c.rope_scale_global),
            Some(8.0)
        );
        let yarn = md(&[("gemma3.rope.scaling.type", Value::String("yarn".into()))]);
        assert!(
            Gemma3Config::from_gguf(&yarn, 1000, None).is_err(),
            "yarn is refused"
        );
    }
}
