//! Chartline's Gemma 3 text model over GGUF files.
//!
//! Written here rather than taken from `candle_transformers::models::quantized_gemma3`, which
//! does not compute Gemma 3: it uses SiLU instead of GELU-tanh, ignores the sliding window
//! while generating, has no RoPE scaling (MedGemma 4B/27B need factor 8), uses the wrong
//! 27B query scale, fails on chunked prefill, and allocates RoPE tables for 131 072 positions
//! plus an f32 copy of the embeddings (3.3 GB for the 270M file).
//!
//! Loading notes:
//! - The token embedding stays quantized (Q8_0 in the Q4_K_M files): only the rows looked up
//!   are dequantized, and the same tensor is the tied output projection.
//! - Q5_0 tensors are rewritten as Q8_0 at load, losslessly: a Q5_0 block is a scale and 32
//!   integers in [-16, 15], which a Q8_0 block with the same scale holds exactly. candle has
//!   no SIMD kernel for Q5_0 but a fast one for Q8_0, and both quantize activations to Q8_0,
//!   so results are identical up to float summation order while decoding gets faster.
//! - RoPE tables cover only the context this instance serves.

mod config;
mod kernels;
mod kv_cache;
mod model;
mod multimodal;
#[cfg(test)]
mod multimodal_reference;
mod safetensors;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device};

pub use config::Gemma3Config;
pub use model::Gemma3;
pub(crate) use model::{Layer as BenchLayer, Weight as BenchWeight};
pub use multimodal::ImageSupport;
pub(crate) use safetensors::{Checkpoint, Keys, sha256_of_files, siglip_vision_config};
pub use safetensors::{SafetensorsBackend, SafetensorsDtype, SafetensorsOptions, load_safetensors};

use crate::error::{Error, Result};
use crate::generation::{CausalLm, LocalBackend};
use crate::identity::{BackendKind, ModelIdentity, sha256_file};
use crate::tokenizer::{Tokenizer, single_gguf_in};

/// Context length served when [`GgufOptions::context_length`] is not set (capped by what
/// the model was trained for).
pub const DEFAULT_CONTEXT_LENGTH: usize = 8192;

/// How to load a GGUF model.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufOptions {
    /// Most positions (prompt plus output) a request may use. Default:
    /// `min(trained context, DEFAULT_CONTEXT_LENGTH)`. Memory for RoPE tables and the KV
    /// cache scales with it.
    pub context_length: Option<usize>,
    /// Prompt tokens per forward pass during prefill.
    pub prefill_chunk: usize,
    /// Rewrite Q5_0 tensors as (equivalent) Q8_0 for speed. See the module docs.
    pub requantize_q5_0: bool,
    /// Multiply Q8_0, Q5_0 and Q4_K matrices with Chartline's own CPU kernels (x86-64 with
    /// AVX2/FMA/F16C; see `kernels`) instead of candle's; they hold Q5_0 both as stored (for
    /// decoding) and widened to Q8_0 (for prefill), whatever `requantize_q5_0` says. Other
    /// types, other CPUs and CUDA always use candle's.
    pub own_kernels: bool,
    /// Keep every weight matrix as dequantized f32 instead of quantized blocks: about 4x the
    /// memory and slower, but free of the activation quantization of the quantized kernels.
    /// For verification (comparing code paths exactly) and debugging, not for serving.
    pub dequantize_weights: bool,
    /// Override of the query scale denominator; by default from the architecture.
    pub query_pre_attn_scalar: Option<f64>,
    /// Run on this CUDA device (needs the `cuda` feature); CPU when `None`.
    pub cuda_device: Option<usize>,
    /// Model name for the identity; default `general.name`, else the file stem.
    pub name: Option<String>,
}

impl Default for GgufOptions {
    fn default() -> Self {
        GgufOptions {
            context_length: None,
            prefill_chunk: 512,
            requantize_q5_0: true,
            own_kernels: true,
            dequantize_weights: false,
            query_pre_attn_scalar: None,
            cuda_device: None,
            name: None,
        }
    }
}

/// The GGUF Gemma 3 backend.
pub type GgufBackend = LocalBackend<Gemma3>;

/// Loads a Gemma 3 GGUF model and its tokenizer. `path` is the `.gguf` file or a folder
/// holding exactly one; a `tokenizer.json` in that folder is preferred over the GGUF's own
/// tokenizer (as [`Tokenizer::from_model_path`] does, so other crates count the same tokens
/// when given the same path). Blocking: seconds of IO and hashing.
pub fn load_gguf(path: impl AsRef<Path>, options: &GgufOptions) -> Result<GgufBackend> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(Error::NotFound(path.to_path_buf()));
    }
    let file_path: PathBuf = if path.is_dir() {
        single_gguf_in(path)?
    } else {
        path.to_path_buf()
    };
    // Hash the file for provenance on a second thread while the weights load.
    std::thread::scope(|scope| {
        let hashing = scope.spawn(|| sha256_file(&file_path));
        let loaded = load_gguf_file(path, &file_path, options);
        let sha256 = hashing
            .join()
            .map_err(|_| Error::Internal("the hashing thread panicked".into()))??;
        let (model, tokenizer, mut identity) = loaded?;
        identity.weights_sha256 = sha256;
        Ok(LocalBackend::new(model, tokenizer, identity))
    })
}

fn load_gguf_file(
    path: &Path,
    file_path: &Path,
    options: &GgufOptions,
) -> Result<(Gemma3, Tokenizer, ModelIdentity)> {
    let started = std::time::Instant::now();
    // Buffered: the header is hundreds of thousands of small reads (the vocabulary).
    let mut file = BufReader::new(File::open(file_path).map_err(|e| Error::io(file_path, e))?);
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| Error::InvalidModel(format!("{}: {e}", file_path.display())))?;

    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "read GGUF header"
    );
    let tokenizer = if path.is_dir() && path.join("tokenizer.json").is_file() {
        Tokenizer::from_tokenizer_json(path.join("tokenizer.json"))?
    } else {
        Tokenizer::from_gguf_metadata(&content.metadata, file_path)?
    };

    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "built tokenizer"
    );
    let device = match options.cuda_device {
        Some(i) => Device::new_cuda(i)?,
        None => Device::Cpu,
    };
    let mut loader = Loader {
        content: &content,
        file: &mut file,
        path: file_path,
        device: &device,
        options,
    };
    let embed = Arc::new(loader.qtensor("token_embd.weight")?);
    let (vocab_size, _) = embed.shape().dims2()?;
    if content.tensor_infos.contains_key("output.weight") {
        // Gemma ties the output projection to the embedding; a separate one would mean a
        // different architecture than this code implements.
        return Err(Error::InvalidModel(
            "untied output.weight is not supported for gemma3".into(),
        ));
    }
    let cfg =
        Gemma3Config::from_gguf(&content.metadata, vocab_size, options.query_pre_attn_scalar)?;
    let context_length = options
        .context_length
        .unwrap_or(DEFAULT_CONTEXT_LENGTH)
        .min(cfg.trained_context_length)
        .max(1);

    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = format!("blk.{i}");
        layers.push(model::Layer {
            wq: loader.matmul(&format!("{p}.attn_q.weight"))?,
            wk: loader.matmul(&format!("{p}.attn_k.weight"))?,
            wv: loader.matmul(&format!("{p}.attn_v.weight"))?,
            wo: loader.matmul(&format!("{p}.attn_output.weight"))?,
            q_norm: loader.vector(&format!("{p}.attn_q_norm.weight"))?,
            k_norm: loader.vector(&format!("{p}.attn_k_norm.weight"))?,
            attn_norm: loader.vector(&format!("{p}.attn_norm.weight"))?,
            post_attn_norm: loader.vector(&format!("{p}.post_attention_norm.weight"))?,
            ffn_norm: loader.vector(&format!("{p}.ffn_norm.weight"))?,
            post_ffn_norm: loader.vector(&format!("{p}.post_ffw_norm.weight"))?,
            gate: loader.matmul(&format!("{p}.ffn_gate.weight"))?,
            up: loader.matmul(&format!("{p}.ffn_up.weight"))?,
            down: loader.matmul(&format!("{p}.ffn_down.weight"))?,
        });
    }
    let final_norm = loader.vector("output_norm.weight")?;
    // The tied embedding serves lookups and the output projection from one copy.
    let (embed, lm_head): (model::Embedding, model::Weight) = match loader.repack(&embed)? {
        Some(m) => {
            let m = Arc::new(m);
            (model::Embedding::Q8(m.clone()), model::Weight::Q8(m))
        }
        None => {
            let lm_head = loader.wrap(embed.clone())?;
            (embed.into(), lm_head.into())
        }
    };
    let model = Gemma3::new(
        cfg,
        embed,
        lm_head,
        layers,
        final_norm,
        context_length,
        options.prefill_chunk.max(1),
        &device,
    )?;

    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "read weights"
    );
    let name = options
        .name
        .clone()
        .or_else(|| {
            content
                .metadata
                .get("general.name")
                .and_then(|v| v.to_string().ok())
                .cloned()
        })
        .or_else(|| {
            file_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "gemma3".to_owned());
    let identity = ModelIdentity {
        name,
        backend: BackendKind::Gguf,
        weights_sha256: String::new(),
        tokenizer_sha256: tokenizer.sha256().to_owned(),
        context_length,
    };
    tracing::info!(
        model = %identity.name,
        context_length,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "loaded GGUF model"
    );
    Ok((model, tokenizer, identity))
}

struct Loader<'a> {
    content: &'a gguf_file::Content,
    file: &'a mut BufReader<File>,
    path: &'a Path,
    device: &'a Device,
    options: &'a GgufOptions,
}

impl Loader<'_> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| {
            Error::InvalidModel(format!("{} lacks tensor {name}", self.path.display()))
        })?;
        if info.ggml_dtype == GgmlDType::Q5_0 && self.options.requantize_q5_0 {
            let q5 = info.read(self.file, self.content.tensor_data_offset, &Device::Cpu)?;
            let q8 = q5_0_to_q8_0(&q5.data()?)?;
            return Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
                GgmlDType::Q8_0,
                &q8,
                info.shape.dims().to_vec(),
                self.device,
            )?);
        }
        Ok(info.read(self.file, self.content.tensor_data_offset, self.device)?)
    }

    fn matmul(&mut self, name: &str) -> Result<model::Weight> {
        if self.kernels_apply()
            && let Some(info) = self.content.tensor_infos.get(name)
            && info.ggml_dtype == GgmlDType::Q5_0
        {
            // Q5_0 goes to Chartline's kernels in both forms (5-bit for decoding, widened
            // to Q8_0 for prefill); candle's path gets the Q8_0 rewrite below.
            let raw = info.read(self.file, self.content.tensor_data_offset, &Device::Cpu)?;
            let (n, k) = raw.shape().dims2()?;
            if let Some(m) = kernels::Q8Matrix::from_q5_0(&raw.data()?, n, k)? {
                return Ok(model::Weight::Q8(Arc::new(m.with_wide())));
            }
        }
        let t = self.qtensor(name)?;
        if let Some(m) = self.repack(&t)? {
            return Ok(model::Weight::Q8(Arc::new(m.with_wide())));
        }
        if self.kernels_apply()
            && let Some(m) = kernels::U4Matrix::from_qtensor(&t)?
        {
            // One-row products (decoding) on Chartline's kernel; prefill on candle's 16-row
            // AVX-512 VNNI tiles where the CPU has them (measured faster there; both pair
            // Q4_K with Q8_K activations, as llama.cpp does).
            let wide = if kernels::wide_k_quants() {
                Some(QMatMul::from_arc(Arc::new(t))?)
            } else {
                None
            };
            return Ok(model::Weight::U4(Arc::new(m), wide));
        }
        Ok(self.wrap(Arc::new(t))?.into())
    }

    /// The tensor repacked for Chartline's Q8_0 kernels, when they apply to it here.
    fn repack(&self, t: &QTensor) -> Result<Option<kernels::Q8Matrix>> {
        if !self.kernels_apply() {
            return Ok(None);
        }
        Ok(kernels::Q8Matrix::from_qtensor(t)?)
    }

    /// Whether Chartline's own kernels may take this model's matrices.
    fn kernels_apply(&self) -> bool {
        self.options.own_kernels && !self.options.dequantize_weights && self.device.is_cpu()
    }

    fn wrap(&self, t: Arc<QTensor>) -> Result<QMatMul> {
        if self.options.dequantize_weights {
            Ok(QMatMul::Tensor(t.dequantize(self.device)?))
        } else {
            Ok(QMatMul::from_arc(t)?)
        }
    }

    fn vector(&mut self, name: &str) -> Result<candle_core::Tensor> {
        Ok(self
            .qtensor(name)?
            .dequantize(self.device)?
            .to_dtype(DType::F32)?)
    }
}

const Q5_0_BLOCK_BYTES: usize = 22;
const Q8_0_BLOCK_BYTES: usize = 34;

/// Rewrites Q5_0 blocks (f16 scale, 32 high bits, 16 bytes of low nibbles) as Q8_0 blocks
/// (the same f16 scale, 32 signed bytes) holding the same values.
fn q5_0_to_q8_0(q5: &[u8]) -> Result<Vec<u8>> {
    if !q5.len().is_multiple_of(Q5_0_BLOCK_BYTES) {
        return Err(Error::InvalidModel(format!(
            "Q5_0 data of {} bytes is not whole blocks",
            q5.len()
        )));
    }
    let mut out = Vec::with_capacity(q5.len() / Q5_0_BLOCK_BYTES * Q8_0_BLOCK_BYTES);
    for block in q5.chunks_exact(Q5_0_BLOCK_BYTES) {
        let (d, rest) = block.split_at(2);
        let (qh, qs) = rest.split_at(4);
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        out.extend_from_slice(d);
        let mut q = [0u8; 32];
        for (j, &byte) in qs.iter().enumerate() {
            let hi0 = (((qh >> j) << 4) & 0x10) as u8;
            let hi1 = ((qh >> (j + 12)) & 0x10) as u8;
            q[j] = (((byte & 0x0F) | hi0) as i8 - 16) as u8;
            q[j + 16] = (((byte >> 4) | hi1) as i8 - 16) as u8;
        }
        out.extend_from_slice(&q);
    }
    Ok(out)
}

/// A text model from parts, for the vision benchmark (random weights).
pub(crate) fn bench_text_model(
    cfg: Gemma3Config,
    embed: Arc<QTensor>,
    lm_head: QMatMul,
    layers: Vec<model::Layer>,
    final_norm: candle_core::Tensor,
    context: usize,
    device: &Device,
) -> Result<Gemma3> {
    Ok(Gemma3::new(
        cfg, embed, lm_head, layers, final_norm, context, context, device,
    )?)
}

/// A projector with weights from `src`, for the vision benchmark.
pub(crate) fn bench_projector(
    src: &mut dyn crate::siglip::WeightSource,
    vision: &crate::siglip::SiglipVisionConfig,
    text_hidden: usize,
    tokens_per_image: usize,
    dtype: DType,
) -> Result<multimodal::Projector> {
    let dv = vision.tower.hidden_size;
    let norm = src.tensor("mm_soft_emb_norm.weight", &[dv], DType::F32)?;
    let projection = src.tensor("mm_input_projection_weight", &[dv, text_hidden], dtype)?;
    multimodal::Projector::new(
        norm,
        vision.tower.layer_norm_eps,
        projection,
        vision.patches_per_side(),
        tokens_per_image,
    )
}

impl CausalLm for Gemma3 {
    fn context_length(&self) -> usize {
        self.max_positions()
    }

    fn prefill_chunk(&self) -> usize {
        self.prefill_chunk()
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        Ok(Gemma3::forward(self, tokens, pos)?)
    }

    fn image_support(&self) -> Option<&ImageSupport> {
        Gemma3::image_support(self)
    }

    fn prefill_with_images(
        &mut self,
        ids: &[u32],
        images: &[crate::backend::ImageInput],
        sink: &dyn crate::backend::TokenSink,
    ) -> Result<Option<Vec<f32>>> {
        Gemma3::prefill_with_images(self, ids, images, sink)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn q5_0_rewritten_as_q8_0_dequantizes_identically() {
        // Random-ish values quantized to Q5_0 by candle, then converted.
        let values: Vec<f32> = (0..32 * 64)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0)
            .collect();
        let t = Tensor::from_vec(values, (64, 32), &Device::Cpu).unwrap();
        let q5 = QTensor::quantize(&t, GgmlDType::Q5_0).unwrap();
        let q8 = q5_0_to_q8_0(&q5.data().unwrap()).unwrap();
        let q8 = candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &q8,
            vec![64, 32],
            &Device::Cpu,
        )
        .unwrap();
        let a: Vec<f32> = q5
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = q8
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b, "Q8_0 holds exactly the Q5_0 values");
    }
}
