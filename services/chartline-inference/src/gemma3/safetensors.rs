//! Gemma 3 text from a Hugging Face checkpoint folder: `config.json`, `tokenizer.json`, and
//! `model.safetensors` or shards listed by `model.safetensors.index.json`.
//!
//! Two layouts load, told apart by the tensor names (not by the config):
//! - text-only `Gemma3ForCausalLM` (`google/medgemma-27b-text-it`): `model.embed_tokens`,
//!   `model.layers.N.…`, `model.norm`, with the hyper-parameters at the top of `config.json`;
//! - multimodal `Gemma3ForConditionalGeneration` (MedGemma 4B): the language model under
//!   `language_model.model.…` (or `model.language_model.…` as newer `transformers` saves it)
//!   with its hyper-parameters under `text_config`. The vision tower and projector are never
//!   read.
//!
//! The model is [`Gemma3`], the same code the GGUF backend runs, over dense weights: matrices
//! in bf16 or f32 ([`SafetensorsDtype`]), RMSNorm weights as f32 with Gemma's `+1` added here
//! (Hugging Face stores `w` and computes `x * (1 + w)`; GGUF conversion bakes the 1 in), the
//! embedding shared with the tied output projection. Activations, norms, attention and the
//! KV cache are f32 either way; a bf16 matrix multiplies a bf16 copy of its input. The
//! embedding scale `sqrt(hidden_size)` is applied in f32 (Hugging Face rounds it to bf16
//! when the model runs in bf16, a difference of ~0.3% on the first residual).
//!
//! Config keys follow `transformers`' `Gemma3TextConfig`, with its defaults where a key is
//! absent (Hub configs omit keys that equal a default), except `hidden_size`,
//! `intermediate_size` and `num_hidden_layers`, which are required: they differ per model
//! size and no default can be right. Both `sliding_window_pattern` and the newer
//! `layer_types` list are read, and both `rope_theta`/`rope_scaling`/`rope_local_base_freq`
//! and `transformers` 5's `rope_parameters`. Unsupported settings (attention biases,
//! attention soft-capping, RoPE scaling other than linear, an activation other than GELU-tanh,
//! a non-periodic layer pattern, bidirectional attention) are refused by name rather than
//! computed wrongly.
//!
//! Tensors are read with positioned reads, one at a time, into their final dtype on the
//! target device: `VarBuilder::from_mmaped_safetensors` would map the files instead, but it
//! is an `unsafe fn` and this workspace denies `unsafe` outside its SIMD kernels. Memory is therefore the weights in
//! the chosen dtype plus one tensor's file bytes in flight; only the tensors the text model
//! uses are read.
//!
//! [`ModelIdentity::weights_sha256`] of a safetensors model is the sha256 of the bytes of the
//! checkpoint's weight files concatenated in file-name order: the files named by the index's
//! `weight_map` (vision shards included), or the one `model.safetensors`, in which case it is
//! that file's ordinary sha256 (the Hub's LFS object id). It is computed on a second thread
//! while the weights load. `tokenizer_sha256` is that of the `tokenizer.json` bytes.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::DEFAULT_CONTEXT_LENGTH;
use super::config::{DEFAULT_SLIDING_WINDOW_PATTERN, Gemma3Config};
use super::model::{Embedding, Gemma3, Layer};
use super::multimodal::{ImageSupport, Projector, Vision};
use crate::error::{Error, Result};
use crate::generation::LocalBackend;
use crate::identity::{BackendKind, ModelIdentity};
use crate::images::ImagePreprocessor;
use crate::siglip::{SiglipTowerConfig, SiglipVision, SiglipVisionConfig, WeightSource};
use crate::tokenizer::Tokenizer;

/// The safetensors Gemma 3 backend (the same model type as the GGUF backend).
pub type SafetensorsBackend = LocalBackend<Gemma3>;

/// The float type weight matrices are kept and multiplied in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SafetensorsDtype {
    /// bfloat16, the checkpoints' own type: half the memory of f32. Fast on CUDA; on CPU
    /// candle's bf16 matrix products were measured about 6x slower than f32.
    #[default]
    Bf16,
    /// float32: exact bf16 checkpoint values, twice the memory, the fast CPU choice.
    F32,
}

impl SafetensorsDtype {
    /// `bf16` or `f32`.
    pub fn as_str(self) -> &'static str {
        match self {
            SafetensorsDtype::Bf16 => "bf16",
            SafetensorsDtype::F32 => "f32",
        }
    }

    pub(crate) fn dtype(self) -> DType {
        match self {
            SafetensorsDtype::Bf16 => DType::BF16,
            SafetensorsDtype::F32 => DType::F32,
        }
    }
}

impl fmt::Display for SafetensorsDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SafetensorsDtype {
    type Err = Error;

    /// `bf16`/`bfloat16` or `f32`/`float32`, any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(SafetensorsDtype::Bf16),
            "f32" | "float32" => Ok(SafetensorsDtype::F32),
            _ => Err(Error::invalid(
                "dtype",
                format!("must be bf16 or f32 (got {s:?})"),
            )),
        }
    }
}

/// How to load a safetensors checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetensorsOptions {
    /// Type of the weight matrices. Default bf16.
    pub dtype: SafetensorsDtype,
    /// Most positions (prompt plus output) a request may use. Default:
    /// `min(max_position_embeddings, DEFAULT_CONTEXT_LENGTH)`. Memory for RoPE tables and the
    /// KV cache scales with it.
    pub context_length: Option<usize>,
    /// Prompt tokens per forward pass during prefill.
    pub prefill_chunk: usize,
    /// Override of the query scale denominator; by default `query_pre_attn_scalar` from the
    /// config (256 when absent, as in `transformers`).
    pub query_pre_attn_scalar: Option<f64>,
    /// Run on this CUDA device (needs the `cuda` feature); CPU when `None`.
    pub cuda_device: Option<usize>,
    /// Model name for the identity; default the folder's name.
    pub name: Option<String>,
    /// Skip a multimodal checkpoint's vision tower and projector (less memory; the model
    /// then refuses images).
    pub text_only: bool,
}

impl Default for SafetensorsOptions {
    fn default() -> Self {
        SafetensorsOptions {
            dtype: SafetensorsDtype::default(),
            context_length: None,
            prefill_chunk: 512,
            query_pre_attn_scalar: None,
            cuda_device: None,
            name: None,
            text_only: false,
        }
    }
}

/// Loads Gemma 3 text from a Hugging Face checkpoint folder: `config.json`, `tokenizer.json`,
/// and `model.safetensors` or the shards named by `model.safetensors.index.json`.
///
/// Both `Gemma3ForCausalLM` checkpoints (`model.layers.N.…`, hyper-parameters at the top of
/// the config; MedGemma 27B text) and `Gemma3ForConditionalGeneration` ones
/// (`language_model.model.…` or `model.language_model.…`, hyper-parameters under
/// `text_config`; MedGemma 4B) load; of the latter only the language model is read. Config
/// keys take `transformers`' defaults when absent, except `hidden_size`, `intermediate_size`
/// and `num_hidden_layers`; settings this model does not implement are refused by key name,
/// and a missing or misshapen tensor by tensor name.
///
/// The identity's `weights_sha256` is the sha256 of the weight files' bytes concatenated in
/// file-name order (all files the index names, vision shards included; for a single
/// `model.safetensors`, its ordinary sha256); `tokenizer_sha256` that of `tokenizer.json`.
///
/// Blocking: reads the text model's weights and hashes every weight file (on a second
/// thread, concurrently).
pub fn load_safetensors(
    dir: impl AsRef<Path>,
    options: &SafetensorsOptions,
) -> Result<SafetensorsBackend> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(Error::NotFound(dir.to_path_buf()));
    }
    let started = std::time::Instant::now();
    let mut checkpoint = Checkpoint::open(dir)?;
    let files: Vec<PathBuf> = checkpoint.shards.iter().map(|s| s.path.clone()).collect();
    // Hash the weight files for provenance on a second thread while the weights load; stop
    // hashing as soon as loading fails.
    let stop_hashing = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let hashing = scope.spawn(|| sha256_concatenated(&files, &stop_hashing));
        let loaded = load_model(dir, &mut checkpoint, options);
        if loaded.is_err() {
            stop_hashing.store(true, Ordering::Relaxed);
        }
        let sha256 = hashing
            .join()
            .map_err(|_| Error::Internal("the hashing thread panicked".into()))?;
        let (model, tokenizer, mut identity) = loaded?;
        identity.weights_sha256 = sha256?;
        tracing::info!(
            model = %identity.name,
            dtype = %options.dtype,
            context_length = identity.context_length,
            shards = files.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded safetensors model"
        );
        Ok(LocalBackend::new(model, tokenizer, identity))
    })
}

fn load_model(
    dir: &Path,
    checkpoint: &mut Checkpoint,
    options: &SafetensorsOptions,
) -> Result<(Gemma3, Tokenizer, ModelIdentity)> {
    let config_path = dir.join("config.json");
    let text = read_json(&config_path)?;
    let hf = TextConfig::from_json(&text, &config_path, options.query_pre_attn_scalar)?;
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(Error::NotFound(tokenizer_path));
    }
    let tokenizer = Tokenizer::from_tokenizer_json(&tokenizer_path)?;

    let prefix = checkpoint.text_prefix()?;
    let embed_name = format!("{prefix}embed_tokens.weight");
    let vocab_size = match hf.vocab_size {
        Some(v) => v,
        None => checkpoint
            .shape_of(&embed_name)?
            .first()
            .copied()
            .unwrap_or(0),
    };
    if tokenizer.vocab_size() > vocab_size {
        return Err(Error::InvalidModel(format!(
            "{} has {} tokens but the model's vocabulary has {vocab_size} rows",
            tokenizer_path.display(),
            tokenizer.vocab_size()
        )));
    }
    let mut cfg = hf.cfg;
    cfg.vocab_size = vocab_size;
    let context_length = options
        .context_length
        .unwrap_or(DEFAULT_CONTEXT_LENGTH)
        .min(cfg.trained_context_length)
        .max(1);

    let device = match options.cuda_device {
        Some(i) => Device::new_cuda(i)?,
        None => Device::Cpu,
    };
    let dtype = options.dtype.dtype();
    let (h, nh, nkv, hd, ffn) = (
        cfg.hidden_size,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.ffn_dim,
    );
    let mut load = |name: &str, shape: &[usize]| checkpoint.tensor(name, shape, dtype, &device);
    let embed = load(&embed_name, &[vocab_size, h])?;
    let mut matrices = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = format!("{prefix}layers.{i}.");
        let m = |t: Tensor| super::model::Weight::from(QMatMul::Tensor(t));
        matrices.push([
            m(load(&format!("{p}self_attn.q_proj.weight"), &[nh * hd, h])?),
            m(load(
                &format!("{p}self_attn.k_proj.weight"),
                &[nkv * hd, h],
            )?),
            m(load(
                &format!("{p}self_attn.v_proj.weight"),
                &[nkv * hd, h],
            )?),
            m(load(&format!("{p}self_attn.o_proj.weight"), &[h, nh * hd])?),
            m(load(&format!("{p}mlp.gate_proj.weight"), &[ffn, h])?),
            m(load(&format!("{p}mlp.up_proj.weight"), &[ffn, h])?),
            m(load(&format!("{p}mlp.down_proj.weight"), &[h, ffn])?),
        ]);
    }
    let lm_head = if hf.tie_word_embeddings {
        QMatMul::Tensor(embed.clone())
    } else {
        QMatMul::Tensor(load(&checkpoint_lm_head(prefix), &[vocab_size, h])?)
    };
    // RMSNorm weights: f32, plus Gemma's 1.
    let mut norm = |name: &str, n: usize| -> Result<Tensor> {
        Ok((checkpoint.tensor(name, &[n], DType::F32, &device)? + 1.0)?)
    };
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for (i, [wq, wk, wv, wo, gate, up, down]) in matrices.into_iter().enumerate() {
        let p = format!("{prefix}layers.{i}.");
        layers.push(Layer {
            wq,
            wk,
            wv,
            wo,
            q_norm: norm(&format!("{p}self_attn.q_norm.weight"), hd)?,
            k_norm: norm(&format!("{p}self_attn.k_norm.weight"), hd)?,
            attn_norm: norm(&format!("{p}input_layernorm.weight"), h)?,
            post_attn_norm: norm(&format!("{p}post_attention_layernorm.weight"), h)?,
            ffn_norm: norm(&format!("{p}pre_feedforward_layernorm.weight"), h)?,
            post_ffn_norm: norm(&format!("{p}post_feedforward_layernorm.weight"), h)?,
            gate,
            up,
            down,
        });
    }
    let final_norm = norm(&format!("{prefix}norm.weight"), h)?;
    let vision = if options.text_only {
        None
    } else {
        load_vision(
            dir,
            &text,
            &config_path,
            checkpoint,
            &tokenizer,
            dtype,
            &device,
            h,
        )?
    };
    let mut model = Gemma3::new(
        cfg,
        Embedding::Dense(embed),
        lm_head,
        layers,
        final_norm,
        context_length,
        options.prefill_chunk.max(1),
        &device,
    )?;
    if let Some(vision) = vision {
        model.set_vision(vision);
    }

    let name = options
        .name
        .clone()
        .or_else(|| {
            dir.canonicalize()
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "gemma3".to_owned());
    let identity = ModelIdentity {
        name,
        backend: BackendKind::Safetensors,
        weights_sha256: String::new(),
        tokenizer_sha256: tokenizer.sha256().to_owned(),
        context_length,
    };
    Ok((model, tokenizer, identity))
}

/// Prefixes of the vision tower and projector: the Hub's legacy layout first, then the one
/// newer `transformers` saves.
const VISION_PREFIXES: [(&str, &str); 2] = [
    ("vision_tower.vision_model", "multi_modal_projector"),
    (
        "model.vision_tower.vision_model",
        "model.multi_modal_projector",
    ),
];

impl WeightSource for (&mut Checkpoint, &Device) {
    fn tensor(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (checkpoint, device) = self;
        checkpoint.tensor(name, shape, dtype, device)
    }
}

/// Reads `vision_config` (SigLIP keys, `transformers`' defaults where absent except the
/// sizes, which differ per model).
pub(crate) fn siglip_vision_config(k: &Keys<'_>) -> Result<SiglipVisionConfig> {
    if let Some(act) = k.opt_str("hidden_act")?
        && act != "gelu_pytorch_tanh"
    {
        return Err(k.err(
            "hidden_act",
            format!("is {act:?}; this tower computes gelu_pytorch_tanh"),
        ));
    }
    Ok(SiglipVisionConfig {
        tower: SiglipTowerConfig {
            hidden_size: k.required_usize("hidden_size")?,
            intermediate_size: k.required_usize("intermediate_size")?,
            num_layers: k.required_usize("num_hidden_layers")?,
            num_heads: k.required_usize("num_attention_heads")?,
            layer_norm_eps: k.positive_f64_or("layer_norm_eps", 1e-6)?,
        },
        image_size: k.required_usize("image_size")?,
        patch_size: k.required_usize("patch_size")?,
        num_channels: k.usize_or("num_channels", 3)?,
        use_head: k.opt_bool("vision_use_head")?.unwrap_or(true),
    })
}

/// Loads the vision tower, projector and image preprocessing of a multimodal checkpoint;
/// `None` when the checkpoint has no vision tower (a text-only export).
#[allow(clippy::too_many_arguments)]
fn load_vision(
    dir: &Path,
    root: &Value,
    config_path: &Path,
    checkpoint: &mut Checkpoint,
    tokenizer: &Tokenizer,
    dtype: DType,
    device: &Device,
    text_hidden: usize,
) -> Result<Option<Vision>> {
    let Some((tower_prefix, projector_prefix)) = VISION_PREFIXES.into_iter().find(|(t, _)| {
        checkpoint
            .index
            .contains_key(&format!("{t}.embeddings.patch_embedding.weight"))
    }) else {
        return Ok(None);
    };
    let obj = root.as_object().ok_or_else(|| {
        Error::InvalidModel(format!("{} is not a JSON object", config_path.display()))
    })?;
    let top = Keys {
        obj,
        prefix: "",
        file: config_path,
    };
    let vision_obj = match top.get("vision_config") {
        Some(Value::Object(o)) => o,
        _ => {
            return Err(top.err(
                "vision_config",
                "is required: the checkpoint has a vision tower",
            ));
        }
    };
    let vk = Keys {
        obj: vision_obj,
        prefix: "vision_config.",
        file: config_path,
    };
    let mut cfg = siglip_vision_config(&vk)?;
    // Gemma 3 reads the patch states; a pooling head, if saved, is not used.
    cfg.use_head = false;
    let tokens_per_image = top.usize_or("mm_tokens_per_image", 256)?;
    let token = |key: &str, default: usize| -> Result<(u32, String)> {
        let id = top.usize_or(key, default)?;
        let id = u32::try_from(id).map_err(|_| top.err(key, "is out of range"))?;
        let text = tokenizer
            .id_to_token(id)
            .ok_or_else(|| top.err(key, format!("({id}) is not a token of tokenizer.json")))?;
        Ok((id, text))
    };
    let (image_token_id, image_token) = token("image_token_index", 262_144)?;
    let (_, boi) = token("boi_token_index", 255_999)?;
    let (_, eoi) = token("eoi_token_index", 256_000)?;
    let reserved = vec![image_token.clone(), eoi.clone()];

    let preprocessor = ImagePreprocessor::from_file(&dir.join("preprocessor_config.json"))?;
    if preprocessor.size() != (cfg.image_size, cfg.image_size) {
        return Err(Error::InvalidModel(format!(
            "preprocessor_config.json resizes to {:?} but vision_config.image_size is {}",
            preprocessor.size(),
            cfg.image_size
        )));
    }
    let mut src = (checkpoint, device);
    let tower = SiglipVision::load(&mut src, tower_prefix, &cfg, dtype)?;
    let dv = cfg.tower.hidden_size;
    let norm = (src.tensor(
        &format!("{projector_prefix}.mm_soft_emb_norm.weight"),
        &[dv],
        DType::F32,
    )? + 1.0)?;
    let projection = src.tensor(
        &format!("{projector_prefix}.mm_input_projection_weight"),
        &[dv, text_hidden],
        dtype,
    )?;
    let projector = Projector::new(
        norm,
        cfg.tower.layer_norm_eps,
        projection,
        cfg.patches_per_side(),
        tokens_per_image,
    )?;
    let expansion = format!("\n\n{boi}{}{eoi}\n\n", image_token.repeat(tokens_per_image));
    Ok(Some(Vision {
        tower,
        projector,
        preprocessor,
        support: ImageSupport {
            placeholder: boi,
            expansion,
            image_token_id,
            reserved,
            tokens_per_image,
            image_size: cfg.image_size,
        },
    }))
}

/// Where the untied output projection lives, given the text model's prefix.
fn checkpoint_lm_head(prefix: &str) -> String {
    match prefix {
        LEGACY_MULTIMODAL_PREFIX => "language_model.lm_head.weight".to_owned(),
        _ => "lm_head.weight".to_owned(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Err(Error::NotFound(path.to_path_buf()));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidModel(format!("{} is not valid JSON: {e}", path.display())))
}

/// Streams `files` one after another through one sha256; gives up when `stop` is set.
/// sha256 of the files' bytes concatenated in order (see [`load_safetensors`]).
pub(crate) fn sha256_of_files(files: &[PathBuf]) -> Result<String> {
    sha256_concatenated(files, &AtomicBool::new(false))
}

/// Streams `files` in order through one sha256; gives up (with an error) once `stop` is set.
fn sha256_concatenated(files: &[PathBuf], stop: &AtomicBool) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Internal("hashing stopped".into()));
            }
            let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

// ---------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------

/// `transformers`' `Gemma3TextConfig` defaults for keys a Hub config may omit.
mod hf_default {
    pub const NUM_ATTENTION_HEADS: usize = 8;
    pub const NUM_KEY_VALUE_HEADS: usize = 4;
    pub const HEAD_DIM: usize = 256;
    pub const RMS_NORM_EPS: f64 = 1e-6;
    pub const ROPE_THETA: f64 = 1_000_000.0;
    pub const ROPE_LOCAL_BASE_FREQ: f64 = 10_000.0;
    pub const SLIDING_WINDOW: usize = 4096;
    pub const QUERY_PRE_ATTN_SCALAR: f64 = 256.0;
    pub const MAX_POSITION_EMBEDDINGS: usize = 131_072;
}

/// What `config.json` says about the text model.
struct TextConfig {
    /// Everything but `vocab_size`, which may come from the embedding's shape.
    cfg: Gemma3Config,
    vocab_size: Option<usize>,
    tie_word_embeddings: bool,
}

/// The keys of one JSON object, with the path used to name them in errors.
#[derive(Clone, Copy)]
pub(crate) struct Keys<'a> {
    obj: &'a Map<String, Value>,
    /// `""` or `"text_config."`.
    prefix: &'a str,
    file: &'a Path,
}

impl<'a> Keys<'a> {
    /// Keys of `obj`, reported as `{prefix}key` of `file`.
    pub(crate) fn new(obj: &'a Map<String, Value>, prefix: &'a str, file: &'a Path) -> Self {
        Keys { obj, prefix, file }
    }

    /// The value of `key`; JSON `null` counts as absent.
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn err(&self, key: &str, what: impl fmt::Display) -> Error {
        Error::InvalidModel(format!(
            "{}: {}{key} {what}",
            self.file.display(),
            self.prefix
        ))
    }

    fn usize_value(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15)
                    .map(|f| f as u64)
            })
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, format!("must be a non-negative integer (got {v})")))
    }

    pub(crate) fn required_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| self.err(key, "is required but missing"))?;
        let n = self.usize_value(key, v)?;
        if n == 0 {
            return Err(self.err(key, "must be positive (got 0)"));
        }
        Ok(n)
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.usize_value(key, v)).transpose()
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        let n = self.opt_usize(key)?.unwrap_or(default);
        if n == 0 {
            return Err(self.err(key, "must be positive (got 0)"));
        }
        Ok(n)
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(key, format!("must be a number (got {v})")))
            })
            .transpose()
    }

    pub(crate) fn positive_f64_or(&self, key: &str, default: f64) -> Result<f64> {
        let x = self.opt_f64(key)?.unwrap_or(default);
        if !(x.is_finite() && x > 0.0) {
            return Err(self.err(key, format!("must be a positive number (got {x})")));
        }
        Ok(x)
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.err(key, format!("must be true or false (got {v})")))
            })
            .transpose()
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.err(key, format!("must be a string (got {v})")))
            })
            .transpose()
    }

    fn opt_object(&self, key: &str) -> Result<Option<Keys<'_>>> {
        self.get(key)
            .map(|v| {
                v.as_object()
                    .map(|obj| Keys {
                        obj,
                        prefix: self.prefix,
                        file: self.file,
                    })
                    .ok_or_else(|| self.err(key, format!("must be an object (got {v})")))
            })
            .transpose()
    }
}

/// RoPE base and linear scale of one kind of layer.
struct RopeSpec {
    base: f64,
    scale: f64,
}

impl TextConfig {
    fn from_json(root: &Value, file: &Path, query_override: Option<f64>) -> Result<Self> {
        let root_obj = root.as_object().ok_or_else(|| {
            Error::InvalidModel(format!("{} is not a JSON object", file.display()))
        })?;
        let top = Keys {
            obj: root_obj,
            prefix: "",
            file,
        };
        let model_type = top.opt_str("model_type")?;
        if let Some(t) = model_type
            && t != "gemma3"
            && t != "gemma3_text"
        {
            return Err(top.err(
                "model_type",
                format!("is {t:?}; this backend runs Gemma 3 (gemma3, gemma3_text)"),
            ));
        }
        let k = match top.get("text_config") {
            Some(Value::Object(obj)) => Keys {
                obj,
                prefix: "text_config.",
                file,
            },
            Some(v) => return Err(top.err("text_config", format!("must be an object (got {v})"))),
            None if model_type == Some("gemma3") => {
                return Err(top.err(
                    "text_config",
                    "is required for model_type gemma3 (multimodal) but missing",
                ));
            }
            None => top,
        };
        if let Some(t) = k.opt_str("model_type")?
            && t != "gemma3_text"
            && k.prefix == "text_config."
        {
            return Err(k.err("model_type", format!("is {t:?}, not gemma3_text")));
        }

        let hidden_size = k.required_usize("hidden_size")?;
        let ffn_dim = k.required_usize("intermediate_size")?;
        let n_layers = k.required_usize("num_hidden_layers")?;
        let n_heads = k.usize_or("num_attention_heads", hf_default::NUM_ATTENTION_HEADS)?;
        let n_kv_heads = k.usize_or("num_key_value_heads", hf_default::NUM_KEY_VALUE_HEADS)?;
        if !n_heads.is_multiple_of(n_kv_heads) {
            return Err(k.err(
                "num_key_value_heads",
                format!("({n_kv_heads}) must divide num_attention_heads ({n_heads})"),
            ));
        }
        let head_dim = k.usize_or("head_dim", hf_default::HEAD_DIM)?;
        if !head_dim.is_multiple_of(2) {
            return Err(k.err(
                "head_dim",
                format!("must be even for RoPE (got {head_dim})"),
            ));
        }
        let rms_eps = k.positive_f64_or("rms_norm_eps", hf_default::RMS_NORM_EPS)?;
        let trained_context_length = k.usize_or(
            "max_position_embeddings",
            hf_default::MAX_POSITION_EMBEDDINGS,
        )?;

        let activation = match k.opt_str("hidden_activation")? {
            Some(a) => Some(("hidden_activation", a)),
            None => k.opt_str("hidden_act")?.map(|a| ("hidden_act", a)),
        };
        if let Some((key, a)) = activation
            && a != "gelu_pytorch_tanh"
            && a != "gelu_new"
        {
            return Err(k.err(
                key,
                format!("{a:?} is not supported (Gemma 3 uses gelu_pytorch_tanh)"),
            ));
        }
        if k.opt_bool("attention_bias")? == Some(true) {
            return Err(k.err("attention_bias", "true is not supported (Gemma 3 has none)"));
        }
        if let Some(c) = k.opt_f64("attn_logit_softcapping")? {
            return Err(k.err(
                "attn_logit_softcapping",
                format!("{c} is not supported (Gemma 3 sets it to null)"),
            ));
        }
        if k.opt_bool("use_bidirectional_attention")? == Some(true) {
            return Err(k.err(
                "use_bidirectional_attention",
                "true is not supported (a causal language model is required)",
            ));
        }
        let final_logit_softcapping = k.opt_f64("final_logit_softcapping")?.filter(|c| *c > 0.0);

        // Which layers are global.
        let sliding_window = match k.obj.get("sliding_window") {
            None => Some(hf_default::SLIDING_WINDOW),
            Some(Value::Null) => None,
            Some(v) => Some(k.usize_value("sliding_window", v)?),
        }
        .filter(|w| *w > 0);
        let (sliding_window, sliding_window_pattern) = match k.get("layer_types") {
            Some(v) => {
                let types = v
                    .as_array()
                    .ok_or_else(|| k.err("layer_types", format!("must be a list (got {v})")))?;
                pattern_of_layer_types(&k, types, n_layers, sliding_window)?
            }
            None => {
                let p = match k.opt_usize("sliding_window_pattern")? {
                    Some(p) => Some(("sliding_window_pattern", p)),
                    None => k
                        .opt_usize("_sliding_window_pattern")?
                        .map(|p| ("_sliding_window_pattern", p)),
                };
                match p {
                    Some((key, 0)) => return Err(k.err(key, "must be positive (got 0)")),
                    Some((_, p)) => (sliding_window, p),
                    None => (sliding_window, DEFAULT_SLIDING_WINDOW_PATTERN),
                }
            }
        };

        let (global, local) = rope_specs(&k)?;
        let query_pre_attn_scalar = match query_override {
            Some(q) => q,
            None => {
                k.positive_f64_or("query_pre_attn_scalar", hf_default::QUERY_PRE_ATTN_SCALAR)?
            }
        };

        let vocab_size = k.opt_usize("vocab_size")?;
        // A multimodal config may state tying at the top level only.
        let tie_word_embeddings = match k.opt_bool("tie_word_embeddings")? {
            Some(t) => t,
            None => top.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        };

        Ok(TextConfig {
            cfg: Gemma3Config {
                hidden_size,
                n_layers,
                n_heads,
                n_kv_heads,
                head_dim,
                value_dim: head_dim,
                ffn_dim,
                rms_eps,
                trained_context_length,
                sliding_window,
                sliding_window_pattern,
                rope_base_global: global.base as f32,
                rope_base_local: local.base as f32,
                rope_scale_global: global.scale as f32,
                query_pre_attn_scalar,
                final_logit_softcapping,
                vocab_size: 0,
            },
            vocab_size,
            tie_word_embeddings,
        })
    }
}

/// The `(sliding_window, sliding_window_pattern)` equivalent to a `layer_types` list: the
/// model implements "every p-th layer is global", which covers every Gemma 3 checkpoint.
fn pattern_of_layer_types(
    k: &Keys<'_>,
    types: &[Value],
    n_layers: usize,
    sliding_window: Option<usize>,
) -> Result<(Option<usize>, usize)> {
    if types.len() != n_layers {
        return Err(k.err(
            "layer_types",
            format!(
                "has {} entries but num_hidden_layers is {n_layers}",
                types.len()
            ),
        ));
    }
    let mut global = Vec::with_capacity(n_layers);
    for (i, t) in types.iter().enumerate() {
        global.push(match t.as_str() {
            Some("full_attention") => true,
            Some("sliding_attention") => false,
            _ => {
                return Err(k.err(
                    &format!("layer_types[{i}]"),
                    format!("must be \"full_attention\" or \"sliding_attention\" (got {t})"),
                ));
            }
        });
    }
    if global.iter().all(|g| *g) || sliding_window.is_none() {
        if global.iter().any(|g| !g) {
            return Err(k.err(
                "sliding_window",
                "is null but layer_types has sliding_attention layers",
            ));
        }
        return Ok((None, DEFAULT_SLIDING_WINDOW_PATTERN));
    }
    let pattern = global
        .iter()
        .position(|g| *g)
        .map_or(n_layers + 1, |i| i + 1);
    if global
        .iter()
        .enumerate()
        .any(|(i, g)| *g != (i + 1).is_multiple_of(pattern))
    {
        return Err(k.err(
            "layer_types",
            "is not periodic (every p-th layer full_attention, the others sliding), \
             which is the only pattern supported",
        ));
    }
    Ok((sliding_window, pattern))
}

/// RoPE of the global and the local layers, from `rope_parameters` (transformers 5) or the
/// older `rope_theta` / `rope_scaling` / `rope_local_base_freq`.
fn rope_specs(k: &Keys<'_>) -> Result<(RopeSpec, RopeSpec)> {
    let mut global = RopeSpec {
        base: k.positive_f64_or("rope_theta", hf_default::ROPE_THETA)?,
        scale: 1.0,
    };
    if let Some(scaling) = k.opt_object("rope_scaling")? {
        global.scale = rope_scale(&scaling, "rope_scaling")?;
    }
    let mut local = RopeSpec {
        base: k.positive_f64_or("rope_local_base_freq", hf_default::ROPE_LOCAL_BASE_FREQ)?,
        scale: 1.0,
    };
    if let Some(params) = k.opt_object("rope_parameters")? {
        let nested =
            params.get("full_attention").is_some() || params.get("sliding_attention").is_some();
        let parts: Vec<(&str, Option<Keys<'_>>, &mut RopeSpec)> = if nested {
            vec![
                (
                    "rope_parameters.full_attention",
                    params.opt_object("full_attention")?,
                    &mut global,
                ),
                (
                    "rope_parameters.sliding_attention",
                    params.opt_object("sliding_attention")?,
                    &mut local,
                ),
            ]
        } else {
            vec![("rope_parameters", Some(params), &mut global)]
        };
        for (name, part, spec) in parts {
            let Some(part) = part else { continue };
            if let Some(theta) = part.opt_f64("rope_theta")? {
                if !(theta.is_finite() && theta > 0.0) {
                    return Err(k.err(
                        &format!("{name}.rope_theta"),
                        format!("must be a positive number (got {theta})"),
                    ));
                }
                spec.base = theta;
            }
            spec.scale = rope_scale(&part, name)?;
        }
    }
    if local.scale != 1.0 {
        return Err(k.err(
            "rope_parameters.sliding_attention",
            format!(
                "scales RoPE by {}; only the global layers may be scaled",
                local.scale
            ),
        ));
    }
    Ok((global, local))
}

/// The linear factor of one RoPE scaling object (`rope_type`, or the older `type`).
fn rope_scale(obj: &Keys<'_>, name: &str) -> Result<f64> {
    let kind = match obj.opt_str("rope_type")? {
        Some(t) => Some(t),
        None => obj.opt_str("type")?,
    };
    match kind.unwrap_or("default") {
        "default" => Ok(1.0),
        "linear" => {
            let factor = obj.opt_f64("factor")?.ok_or_else(|| {
                obj.err(
                    &format!("{name}.factor"),
                    "is required for linear RoPE scaling but missing",
                )
            })?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(obj.err(
                    &format!("{name}.factor"),
                    format!("must be a positive number (got {factor})"),
                ));
            }
            Ok(factor)
        }
        other => Err(obj.err(
            &format!("{name}.rope_type"),
            format!("{other:?} is not supported (only default and linear)"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Safetensors files
// ---------------------------------------------------------------------------------------

const TEXT_PREFIX: &str = "model.";
const LEGACY_MULTIMODAL_PREFIX: &str = "language_model.model.";
const MULTIMODAL_PREFIX: &str = "model.language_model.";
/// Largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's entry in a safetensors header.
#[derive(Clone)]
struct TensorInfo {
    /// `None` for a dtype this loader does not read (integers, float8…).
    dtype: Option<DType>,
    dtype_name: String,
    shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    start: u64,
    end: u64,
}

struct Shard {
    path: PathBuf,
    file: File,
    data_start: u64,
    tensors: HashMap<String, TensorInfo>,
}

/// A checkpoint's weight files, opened and their headers read.
pub(crate) struct Checkpoint {
    dir: PathBuf,
    /// In file-name order.
    shards: Vec<Shard>,
    /// Tensor name to shard index.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.is_file() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    Error::InvalidModel(format!(
                        "{} lacks a weight_map object",
                        index_path.display()
                    ))
                })?;
            let mut names = BTreeSet::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::InvalidModel(format!(
                        "{}: weight_map[{tensor:?}] must be a file name (got {file})",
                        index_path.display()
                    ))
                })?;
                // A bare file name in this folder, nothing that walks elsewhere.
                if Path::new(file).file_name().and_then(|n| n.to_str()) != Some(file) {
                    return Err(Error::InvalidModel(format!(
                        "{}: weight_map[{tensor:?}] = {file:?} is not a file name in the folder",
                        index_path.display()
                    )));
                }
                names.insert(file);
            }
            if names.is_empty() {
                return Err(Error::InvalidModel(format!(
                    "{}: weight_map is empty",
                    index_path.display()
                )));
            }
            let shards = names
                .iter()
                .map(|n| Shard::open(&dir.join(n)))
                .collect::<Result<Vec<_>>>()?;
            let shard_of: HashMap<&str, usize> =
                names.into_iter().enumerate().map(|(i, n)| (n, i)).collect();
            let by_tensor = map
                .iter()
                .filter_map(|(tensor, file)| {
                    let i = shard_of.get(file.as_str()?)?;
                    Some((tensor.clone(), *i))
                })
                .collect();
            Ok(Checkpoint {
                dir: dir.to_path_buf(),
                shards,
                index: by_tensor,
            })
        } else {
            let path = dir.join("model.safetensors");
            if !path.is_file() {
                return Err(Error::NotFound(path));
            }
            let shard = Shard::open(&path)?;
            let index = shard.tensors.keys().map(|k| (k.clone(), 0)).collect();
            Ok(Checkpoint {
                dir: dir.to_path_buf(),
                shards: vec![shard],
                index,
            })
        }
    }

    /// The weight files, in file-name order.
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// The prefix of the language model's tensor names.
    fn text_prefix(&self) -> Result<&'static str> {
        [TEXT_PREFIX, LEGACY_MULTIMODAL_PREFIX, MULTIMODAL_PREFIX]
            .into_iter()
            .find(|p| self.index.contains_key(&format!("{p}embed_tokens.weight")))
            .ok_or_else(|| {
                Error::InvalidModel(format!(
                    "{} lacks tensor {TEXT_PREFIX}embed_tokens.weight (nor is there \
                     {LEGACY_MULTIMODAL_PREFIX}embed_tokens.weight or \
                     {MULTIMODAL_PREFIX}embed_tokens.weight): not a Gemma 3 checkpoint",
                    self.dir.display()
                ))
            })
    }

    /// The shard index and header entry of tensor `name`.
    fn info(&self, name: &str) -> Result<(usize, &TensorInfo)> {
        let (index, shard) = self
            .index
            .get(name)
            .and_then(|&i| Some((i, self.shards.get(i)?)))
            .ok_or_else(|| {
                Error::InvalidModel(format!("{} lacks tensor {name}", self.dir.display()))
            })?;
        let info = shard.tensors.get(name).ok_or_else(|| {
            Error::InvalidModel(format!(
                "{} lacks tensor {name} (the index places it in that file)",
                shard.path.display()
            ))
        })?;
        Ok((index, info))
    }

    fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.1.shape.clone())
    }

    /// Reads tensor `name`, which must have `shape`, as `dtype` on `device`.
    pub(crate) fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (index, info) = self.info(name)?;
        let info = info.clone();
        let shard = &mut self.shards[index];
        if info.shape != shape {
            return Err(Error::InvalidModel(format!(
                "tensor {name} in {} has shape {:?}, expected {shape:?}",
                shard.path.display(),
                info.shape
            )));
        }
        let file_dtype = info.dtype.ok_or_else(|| {
            Error::InvalidModel(format!(
                "tensor {name} in {} has dtype {}; only BF16, F16, F32 and F64 are read",
                shard.path.display(),
                info.dtype_name
            ))
        })?;
        let len = usize::try_from(info.end - info.start)
            .map_err(|_| Error::InvalidModel(format!("tensor {name} is too large")))?;
        // Not zero-filled first: tens of gigabytes for a large model.
        let mut bytes = Vec::with_capacity(len);
        let offset = shard.data_start + info.start;
        shard
            .file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| (&mut shard.file).take(len as u64).read_to_end(&mut bytes))
            .map_err(|e| Error::io(&shard.path, e))?;
        if bytes.len() != len {
            return Err(Error::InvalidModel(format!(
                "{} ends inside tensor {name}",
                shard.path.display()
            )));
        }
        let t = Tensor::from_raw_buffer(&bytes, file_dtype, shape, device)?;
        drop(bytes);
        Ok(t.to_dtype(dtype)?)
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound(path.to_path_buf()));
        }
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let bad = |what: String| Error::InvalidModel(format!("{}: {what}", path.display()));
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
            return Err(bad(format!(
                "not a safetensors file (header of {header_len} bytes in a file of {file_len})"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let header: Map<String, Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("safetensors header is not a JSON object: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = file_len - data_start;
        let mut tensors = HashMap::with_capacity(header.len());
        for (name, entry) in &header {
            if name == "__metadata__" {
                continue;
            }
            let info = parse_tensor_info(name, entry, data_len).map_err(bad)?;
            tensors.insert(name.clone(), info);
        }
        Ok(Shard {
            path: path.to_path_buf(),
            file,
            data_start,
            tensors,
        })
    }
}

fn parse_tensor_info(
    name: &str,
    entry: &Value,
    data_len: u64,
) -> std::result::Result<TensorInfo, String> {
    let bad = |what: &str| format!("tensor {name}: {what} in the header");
    let dtype_name = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no dtype"))?;
    let dtype = match dtype_name {
        "BF16" => Some(DType::BF16),
        "F16" => Some(DType::F16),
        "F32" => Some(DType::F32),
        "F64" => Some(DType::F64),
        _ => None,
    };
    let shape = entry
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no shape"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("a bad shape"))?;
    let offsets = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no data_offsets"))?;
    let (start, end) = match offsets.as_slice() {
        [s, e] => (
            s.as_u64().ok_or_else(|| bad("bad data_offsets"))?,
            e.as_u64().ok_or_else(|| bad("bad data_offsets"))?,
        ),
        _ => return Err(bad("bad data_offsets")),
    };
    if start > end || end > data_len {
        return Err(format!(
            "tensor {name}: bytes {start}..{end} lie outside the {data_len} data bytes"
        ));
    }
    if let Some(dtype) = dtype {
        let elements = shape
            .iter()
            .try_fold(1u64, |n, d| n.checked_mul(*d as u64))
            .ok_or_else(|| bad("an overflowing shape"))?;
        if elements.checked_mul(dtype.size_in_bytes() as u64) != Some(end - start) {
            return Err(format!(
                "tensor {name}: {} bytes do not hold shape {shape:?} of {dtype_name}",
                end - start
            ));
        }
    }
    Ok(TensorInfo {
        dtype,
        dtype_name: dtype_name.to_owned(),
        shape,
        start,
        end,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<TextConfig> {
        let v: Value = serde_json::from_str(json).unwrap();
        TextConfig::from_json(&v, Path::new("config.json"), None)
    }

    /// `google/medgemma-27b-text-it`'s config (as on the Hub, transformers 4.51).
    const MEDGEMMA_27B: &str = r#"{
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "attn_logit_softcapping": null, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": [1, 106],
        "final_logit_softcapping": null, "head_dim": 128,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 5376,
        "initializer_range": 0.02, "intermediate_size": 21504,
        "max_position_embeddings": 131072, "model_type": "gemma3_text",
        "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
        "pad_token_id": 0, "query_pre_attn_scalar": 168, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
        "sliding_window": 1024, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
        "use_cache": true, "vocab_size": 262208
    }"#;

    #[test]
    fn medgemma_27b_text_config() {
        let c = parse(MEDGEMMA_27B).unwrap();
        let g = &c.cfg;
        assert_eq!(
            (
                g.hidden_size,
                g.n_layers,
                g.n_heads,
                g.n_kv_heads,
                g.head_dim,
                g.ffn_dim
            ),
            (5376, 62, 32, 16, 128, 21504)
        );
        assert_eq!(g.query_pre_attn_scalar, 168.0);
        assert_eq!((g.rope_base_global, g.rope_scale_global), (1e6, 8.0));
        assert_eq!(g.rope_base_local, 1e4);
        assert_eq!(g.sliding_window, Some(1024));
        assert_eq!(g.trained_context_length, 131072);
        assert_eq!(g.final_logit_softcapping, None);
        assert_eq!(c.vocab_size, Some(262208));
        assert!(c.tie_word_embeddings);
        let globals: Vec<usize> = (0..62).filter(|&i| g.is_global(i)).collect();
        assert_eq!(globals, vec![5, 11, 17, 23, 29, 35, 41, 47, 53, 59]);
    }

    #[test]
    fn minimal_multimodal_config_takes_transformers_defaults() {
        // gemma-3-4b-it's original config lists only what differs from the defaults.
        let c = parse(
            r#"{"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                  "model_type": "gemma3_text", "num_hidden_layers": 34,
                  "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                  "sliding_window": 1024},
                "vision_config": {"hidden_size": 1152}}"#,
        )
        .unwrap();
        let g = &c.cfg;
        assert_eq!((g.n_heads, g.n_kv_heads, g.head_dim), (8, 4, 256));
        assert_eq!(g.query_pre_attn_scalar, 256.0);
        assert_eq!(g.rms_eps, 1e-6);
        assert_eq!(g.sliding_window_pattern, 6);
        assert_eq!(g.rope_scale_global, 8.0);
        assert_eq!(c.vocab_size, None);
    }

    fn v5_config(types: &[&str]) -> String {
        format!(
            r#"{{"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": {}, "sliding_window": 512, "layer_types": {},
                "rope_parameters": {{
                  "full_attention": {{"rope_type": "linear", "factor": 8.0,
                                      "rope_theta": 1000000.0}},
                  "sliding_attention": {{"rope_type": "default", "rope_theta": 10000.0}}}}}}"#,
            types.len(),
            serde_json::to_string(types).unwrap()
        )
    }

    #[test]
    fn layer_types_and_rope_parameters_of_transformers_5() {
        let mut types = vec!["sliding_attention"; 12];
        types[5] = "full_attention";
        types[11] = "full_attention";
        let g = parse(&v5_config(&types)).unwrap().cfg;
        assert_eq!(g.sliding_window_pattern, 6);
        assert_eq!(g.sliding_window, Some(512));
        assert_eq!(
            (g.rope_base_global, g.rope_scale_global, g.rope_base_local),
            (1e6, 8.0, 1e4)
        );

        types[4] = "full_attention";
        let err = parse(&v5_config(&types))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("layer_types") && err.contains("periodic"),
            "{err}"
        );

        let all_sliding = vec!["sliding_attention"; 3];
        let g = parse(&v5_config(&all_sliding)).unwrap().cfg;
        assert!((0..3).all(|i| !g.is_global(i)));
        let all_full = vec!["full_attention"; 3];
        let g = parse(&v5_config(&all_full)).unwrap().cfg;
        assert!((0..3).all(|i| g.is_global(i)));
    }

    #[test]
    fn errors_name_the_key() {
        let missing = MEDGEMMA_27B.replace(r#""hidden_size": 5376,"#, "");
        let err = parse(&missing)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("hidden_size is required but missing"), "{err}");

        let yarn = MEDGEMMA_27B.replace(r#""rope_type": "linear""#, r#""rope_type": "yarn""#);
        let err = parse(&yarn)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("rope_scaling.rope_type") && err.contains("yarn"),
            "{err}"
        );

        let capped = MEDGEMMA_27B.replace(
            r#""attn_logit_softcapping": null"#,
            r#""attn_logit_softcapping": 50.0"#,
        );
        let err = parse(&capped)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("attn_logit_softcapping"), "{err}");

        let gelu = MEDGEMMA_27B.replace("gelu_pytorch_tanh", "gelu");
        let err = parse(&gelu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("hidden_activation"), "{err}");

        let nested = r#"{"model_type": "gemma3", "text_config": {"hidden_size": 64,
            "num_hidden_layers": 2}}"#;
        let err = parse(nested)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("text_config.intermediate_size is required"),
            "{err}"
        );
    }

    #[test]
    fn header_entries_are_checked_against_the_data() {
        let entry: Value =
            serde_json::from_str(r#"{"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}"#)
                .unwrap();
        assert!(parse_tensor_info("w", &entry, 12).is_ok());
        assert!(parse_tensor_info("w", &entry, 11).is_err(), "past the end");
        let short: Value =
            serde_json::from_str(r#"{"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 12]}"#)
                .unwrap();
        let err = parse_tensor_info("w", &short, 100)
            .err()
            .unwrap_or_default();
        assert!(err.contains("tensor w"), "{err}");
    }
}
