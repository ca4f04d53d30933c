//! The vision benchmark: MedGemma 4B's SigLIP tower and projector on one 896×896 image,
//! against prefill of the same number of text tokens (256 soft tokens) through MedGemma
//! 4B's text model, both with random weights of the real shapes (timing does not depend
//! on the values). The tower runs dense (f32 or bf16 weights, as the safetensors backend
//! loads it); the text model runs as a CPU deployment would: Q4_K matrices and a Q8_0
//! embedding, like a Q4_K_M GGUF.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::SafetensorsDtype;
use crate::error::Result;
use crate::gemma3::{Gemma3, Gemma3Config, bench_text_model};
use crate::siglip::{SiglipTowerConfig, SiglipVision, SiglipVisionConfig, WeightSource};

/// MedGemma 4B's vision tower (`google/medgemma-4b-it` `vision_config`).
pub fn medgemma_4b_vision_config() -> SiglipVisionConfig {
    SiglipVisionConfig {
        tower: SiglipTowerConfig {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_layers: 27,
            num_heads: 16,
            layer_norm_eps: 1e-6,
        },
        image_size: 896,
        patch_size: 14,
        num_channels: 3,
        use_head: false,
    }
}

/// MedGemma 4B's language model (`text_config`).
pub fn medgemma_4b_text_config() -> Gemma3Config {
    Gemma3Config {
        hidden_size: 2560,
        n_layers: 34,
        n_heads: 8,
        n_kv_heads: 4,
        head_dim: 256,
        value_dim: 256,
        ffn_dim: 10240,
        rms_eps: 1e-6,
        trained_context_length: 131_072,
        sliding_window: Some(1024),
        sliding_window_pattern: 6,
        rope_base_global: 1_000_000.0,
        rope_base_local: 10_000.0,
        rope_scale_global: 8.0,
        query_pre_attn_scalar: 256.0,
        final_logit_softcapping: None,
        vocab_size: 262_208,
    }
}

/// Random weights of whatever shape is asked for (N(0, 0.02); norms around 1).
struct RandomWeights {
    device: Device,
}

impl WeightSource for RandomWeights {
    fn tensor(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = if name.contains("norm") {
            Tensor::ones(shape, DType::F32, &self.device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, &self.device)?
        };
        Ok(t.to_dtype(dtype)?)
    }
}

/// Timings of one benchmark run, in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct VisionBenchResult {
    /// Tower forward of one image, per run.
    pub tower_ms: Vec<f64>,
    /// Projector (pool, norm, projection), per run.
    pub projector_ms: Vec<f64>,
    /// Text prefill of `soft_tokens` tokens, per run.
    pub prefill_ms: Vec<f64>,
    /// Soft tokens per image.
    pub soft_tokens: usize,
    /// Seconds spent building the random models.
    pub setup_s: f64,
}

/// Runs the benchmark `runs` times with the tower's weights in `dtype`.
pub fn run_vision_bench(runs: usize, dtype: SafetensorsDtype) -> Result<VisionBenchResult> {
    let dtype = dtype.dtype();
    let started = Instant::now();
    let device = Device::Cpu;
    let vcfg = medgemma_4b_vision_config();
    let mut src = RandomWeights {
        device: device.clone(),
    };
    let tower = SiglipVision::load(&mut src, "vision_tower.vision_model", &vcfg, dtype)?;
    let tokens = 256;
    let tcfg = medgemma_4b_text_config();
    let projector =
        crate::gemma3::bench_projector(&mut src, &vcfg, tcfg.hidden_size, tokens, dtype)?;
    let mut text = random_q4k_text_model(tcfg, tokens + 8)?;
    let mut result = VisionBenchResult {
        soft_tokens: tokens,
        setup_s: started.elapsed().as_secs_f64(),
        ..VisionBenchResult::default()
    };
    let pixels = Tensor::randn(0f32, 0.5, (1, 3, vcfg.image_size, vcfg.image_size), &device)?;
    let ids: Vec<u32> = (0..tokens as u32).map(|i| 1000 + i * 7).collect();
    for _ in 0..runs {
        let t = Instant::now();
        let states = tower.forward(&pixels)?;
        result.tower_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let soft = projector.forward(&states)?;
        let _ = soft.sum_all()?.to_scalar::<f32>()?;
        result.projector_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let _ = text.forward(&ids, 0)?;
        result.prefill_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(result)
}

/// Random quantized blocks of `kind` (Q4_K or Q8_0) for a (rows, cols) matrix, built
/// directly as bytes: quantizing random floats with candle's k-quant search takes many
/// minutes for 4B weights, and the timing does not depend on the values. Every block's
/// f16 scales are a small normal number (0x1419 ≈ 0.001), the rest random bytes.
fn random_blocks(rows: usize, cols: usize, kind: GgmlDType, seed: &mut u64) -> Result<QTensor> {
    let (block_values, block_bytes, scale_bytes) = match kind {
        GgmlDType::Q4K => (256, 144, 4),
        GgmlDType::Q8_0 => (32, 34, 2),
        other => {
            return Err(crate::Error::Internal(format!(
                "no random blocks for {other:?}"
            )));
        }
    };
    let blocks = rows * cols / block_values;
    let mut data = vec![0u8; blocks * block_bytes];
    for block in data.chunks_exact_mut(block_bytes) {
        for pair in block[..scale_bytes].chunks_exact_mut(2) {
            pair.copy_from_slice(&0x1419u16.to_le_bytes());
        }
        for b in &mut block[scale_bytes..] {
            // xorshift64
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *b = (*seed >> 32) as u8;
        }
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        kind,
        &data,
        vec![rows, cols],
        &Device::Cpu,
    )?)
}

/// A Gemma 3 text model of `cfg`'s shapes with random Q4_K matrices and a Q8_0 embedding.
fn random_q4k_text_model(cfg: Gemma3Config, context: usize) -> Result<Gemma3> {
    let device = Device::Cpu;
    let seed = std::cell::Cell::new(0x9E37_79B9_7F4A_7C15u64);
    let q = |rows: usize, cols: usize, kind: GgmlDType| -> Result<QTensor> {
        let mut s = seed.get();
        let t = random_blocks(rows, cols, kind, &mut s)?;
        seed.set(s);
        Ok(t)
    };
    let (h, nh, nkv, hd, f) = (
        cfg.hidden_size,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.ffn_dim,
    );
    let mm = |rows: usize, cols: usize| -> Result<crate::gemma3::BenchWeight> {
        Ok(QMatMul::from_qtensor(q(rows, cols, GgmlDType::Q4K)?)?.into())
    };
    let ones = |n: usize| -> Result<Tensor> { Ok(Tensor::ones(n, DType::F32, &device)?) };
    let embed = Arc::new(q(cfg.vocab_size, h, GgmlDType::Q8_0)?);
    let lm_head = QMatMul::from_arc(embed.clone())?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for _ in 0..cfg.n_layers {
        layers.push(crate::gemma3::BenchLayer {
            wq: mm(nh * hd, h)?,
            wk: mm(nkv * hd, h)?,
            wv: mm(nkv * hd, h)?,
            wo: mm(h, nh * hd)?,
            q_norm: ones(hd)?,
            k_norm: ones(hd)?,
            attn_norm: ones(h)?,
            post_attn_norm: ones(h)?,
            ffn_norm: ones(h)?,
            post_ffn_norm: ones(h)?,
            gate: mm(f, h)?,
            up: mm(f, h)?,
            down: mm(h, f)?,
        });
    }
    let final_norm = ones(h)?;
    bench_text_model(cfg, embed, lm_head, layers, final_norm, context, &device)
}
