//! SigLIP encoders: the vision transformer MedGemma's image tower is made of, and the
//! dual encoder (vision + text towers in one space) MedSigLIP is.
//!
//! Written from the `transformers` modelling code (`modeling_siglip.py`); struct fields
//! mirror the checkpoint names, so `vision_model.encoder.layers.N.self_attn.q_proj` is
//! `layers[N].attn.q`. Per encoder layer (pre-norm):
//!
//! ```text
//! h = x + out_proj(attention(layer_norm1(x)))        (full, unmasked attention)
//! y = h + fc2(gelu_tanh(fc1(layer_norm2(h))))
//! ```
//!
//! Vision: non-overlapping `patch × patch` patches (the stride-`patch` convolution of the
//! checkpoint, computed as one matrix product over unfolded patches), plus a learned
//! position embedding per patch (no class token); encoder; `post_layernorm`. MedSigLIP adds
//! the attention-pooling head (a learned probe attends over the patches with
//! `nn.MultiheadAttention`, then layer norm and an MLP with a residual); Gemma 3 reads the
//! post-layer-norm patch states instead.
//!
//! Text: token plus position embeddings (inputs padded to `max_position_embeddings`), the
//! same encoder, `final_layer_norm`, the last position's state, and the `head` projection.
//! SigLIP was trained attending to the padding; `transformers` hides padded keys when its
//! processor returns an attention mask (its fast tokenizer does), and Chartline follows
//! `transformers` (both variants are checked against it in the tests).
//!
//! Weights are stored in the checkpoint's float type choice ([`SafetensorsDtype`]); biases,
//! norms and every activation are f32, and a bf16 matrix multiplies a bf16 copy of its
//! input (as the Gemma 3 text model does).
//!
//! [`SafetensorsDtype`]: crate::SafetensorsDtype

use candle_core::{D, DType, Result as CResult, Tensor};

use crate::error::{Error, Result};

/// Keeps one attention score matrix chunk near this many f32 values (256 MiB): a 4096-patch
/// image with 16 heads would otherwise take 1 GiB per layer.
const ATTENTION_CHUNK_VALUES: usize = 64 << 20;

/// What the encoders read their weights from: a checkpoint's tensors by name.
pub(crate) trait WeightSource {
    /// Reads tensor `name`, which must have `shape`, as `dtype`.
    fn tensor(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
}

/// `x @ wᵀ + b` with the weight in its stored type and the bias and result in f32.
pub(crate) struct Linear {
    /// (out, in)
    w: Tensor,
    /// (out,), f32
    b: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
        bias: bool,
    ) -> Result<Self> {
        let w = src.tensor(&format!("{prefix}.weight"), &[out_dim, in_dim], dtype)?;
        let b = if bias {
            Some(src.tensor(&format!("{prefix}.bias"), &[out_dim], DType::F32)?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }

    fn from_parts(w: Tensor, b: Option<Tensor>) -> Self {
        Linear { w, b }
    }

    /// (…, in) f32 → (…, out) f32.
    pub(crate) fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let y = if self.w.dtype() == x2.dtype() {
            x2.matmul(&self.w.t()?)?
        } else {
            x2.to_dtype(self.w.dtype())?
                .matmul(&self.w.t()?)?
                .to_dtype(x.dtype())?
        };
        let y = match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.w.dim(0)?;
        }
        y.reshape(out)
    }
}

/// LayerNorm with f32 weight and bias.
pub(crate) struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        dim: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(LayerNorm {
            w: src.tensor(&format!("{prefix}.weight"), &[dim], DType::F32)?,
            b: src.tensor(&format!("{prefix}.bias"), &[dim], DType::F32)?,
            eps: eps as f32,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.w, &self.b, self.eps)
    }
}

/// Hyper-parameters of one SigLIP tower, as `transformers`' `SiglipVisionConfig` /
/// `SiglipTextConfig` name them.
#[derive(Clone, Debug, PartialEq)]
pub struct SiglipTowerConfig {
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `layer_norm_eps`.
    pub layer_norm_eps: f64,
}

impl SiglipTowerConfig {
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(Error::InvalidModel(format!(
                "{what}.num_attention_heads ({}) must divide hidden_size ({})",
                self.num_heads, self.hidden_size
            )));
        }
        Ok(())
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The transformer encoder shared by both towers.
pub(crate) struct Encoder {
    cfg: SiglipTowerConfig,
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    pub(crate) fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        cfg: &SiglipTowerConfig,
        dtype: DType,
    ) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("{prefix}.layers.{i}");
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(
                    src,
                    &format!("{p}.layer_norm1"),
                    h,
                    cfg.layer_norm_eps,
                )?,
                attn: Attention {
                    q: Linear::load(src, &format!("{p}.self_attn.q_proj"), h, h, dtype, true)?,
                    k: Linear::load(src, &format!("{p}.self_attn.k_proj"), h, h, dtype, true)?,
                    v: Linear::load(src, &format!("{p}.self_attn.v_proj"), h, h, dtype, true)?,
                    out: Linear::load(src, &format!("{p}.self_attn.out_proj"), h, h, dtype, true)?,
                },
                layer_norm2: LayerNorm::load(
                    src,
                    &format!("{p}.layer_norm2"),
                    h,
                    cfg.layer_norm_eps,
                )?,
                fc1: Linear::load(src, &format!("{p}.mlp.fc1"), f, h, dtype, true)?,
                fc2: Linear::load(src, &format!("{p}.mlp.fc2"), h, f, dtype, true)?,
            });
        }
        Ok(Encoder {
            cfg: cfg.clone(),
            layers,
        })
    }

    /// (B, N, hidden) → (B, N, hidden). `mask`: additive (B, 1, 1, N) over keys, or none.
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> CResult<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            let h = layer.layer_norm1.forward(&x)?;
            let a = self_attention(&layer.attn, &h, self.cfg.num_heads, mask)?;
            x = (x + a)?;
            let h = layer.layer_norm2.forward(&x)?;
            let m = layer.fc2.forward(&layer.fc1.forward(&h)?.gelu()?)?;
            x = (x + m)?;
        }
        Ok(x)
    }
}

/// Multi-head attention of `x` (B, N, hidden) over itself (bidirectional; `mask` hides
/// padded keys).
fn self_attention(
    w: &Attention,
    x: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> CResult<Tensor> {
    let (b, n, h) = x.dims3()?;
    let hd = h / heads;
    // (B, heads, N, head_dim)
    let split = |t: Tensor| -> CResult<Tensor> {
        t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous()
    };
    let q = (split(w.q.forward(x)?)? * (1.0 / (hd as f64).sqrt()))?;
    let k = split(w.k.forward(x)?)?;
    let v = split(w.v.forward(x)?)?;
    let attn = attend(&q, &k, &v, mask)?; // (B, heads, N, head_dim)
    let attn = attn.transpose(1, 2)?.reshape((b, n, h))?;
    w.out.forward(&attn)
}

/// softmax(q kᵀ) v for already-scaled queries (B, heads, Nq, d) over keys (B, heads, Nk, d),
/// in query chunks that keep each score matrix near [`ATTENTION_CHUNK_VALUES`].
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> CResult<Tensor> {
    let (b, heads, nq, _) = q.dims4()?;
    let nk = k.dim(2)?;
    let kt = k.t()?;
    let chunk = (ATTENTION_CHUNK_VALUES / (b * heads * nk).max(1)).clamp(1, nq.max(1));
    let mut outs = Vec::with_capacity(nq.div_ceil(chunk));
    let mut start = 0;
    while start < nq {
        let len = chunk.min(nq - start);
        let qc = q.narrow(2, start, len)?;
        let scores = qc.matmul(&kt)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(v)?);
        start += len;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 2)
    }
}

/// Hyper-parameters of the vision tower.
#[derive(Clone, Debug, PartialEq)]
pub struct SiglipVisionConfig {
    /// The encoder's sizes.
    pub tower: SiglipTowerConfig,
    /// `image_size` (square).
    pub image_size: usize,
    /// `patch_size`.
    pub patch_size: usize,
    /// `num_channels`.
    pub num_channels: usize,
    /// `vision_use_head`: whether the attention-pooling head exists.
    pub use_head: bool,
}

impl SiglipVisionConfig {
    /// Patches per side of the grid.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
}

/// The attention-pooling head (`vision_model.head`).
struct PoolingHead {
    /// (1, 1, hidden)
    probe: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl PoolingHead {
    fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        cfg: &SiglipTowerConfig,
        dtype: DType,
    ) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let probe = src.tensor(&format!("{prefix}.probe"), &[1, 1, h], DType::F32)?;
        // nn.MultiheadAttention packs q, k, v row-wise in one projection.
        let in_w = src.tensor(
            &format!("{prefix}.attention.in_proj_weight"),
            &[3 * h, h],
            dtype,
        )?;
        let in_b = src.tensor(
            &format!("{prefix}.attention.in_proj_bias"),
            &[3 * h],
            DType::F32,
        )?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear::from_parts(
                in_w.narrow(0, i * h, h)?.contiguous()?,
                Some(in_b.narrow(0, i * h, h)?.contiguous()?),
            ))
        };
        Ok(PoolingHead {
            probe,
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out: Linear::load(
                src,
                &format!("{prefix}.attention.out_proj"),
                h,
                h,
                dtype,
                true,
            )?,
            layernorm: LayerNorm::load(src, &format!("{prefix}.layernorm"), h, cfg.layer_norm_eps)?,
            fc1: Linear::load(src, &format!("{prefix}.mlp.fc1"), f, h, dtype, true)?,
            fc2: Linear::load(src, &format!("{prefix}.mlp.fc2"), h, f, dtype, true)?,
            heads: cfg.num_heads,
        })
    }

    /// (B, N, hidden) → (B, hidden).
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (b, n, h) = x.dims3()?;
        let hd = h / self.heads;
        let probe = self.probe.broadcast_as((b, 1, h))?.contiguous()?;
        let q = self
            .q
            .forward(&probe)?
            .reshape((b, 1, self.heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = (q * (1.0 / (hd as f64).sqrt()))?;
        let split = |t: Tensor| -> CResult<Tensor> {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let attn = attend(&q, &k, &v, None)?
            .transpose(1, 2)?
            .reshape((b, 1, h))?;
        let pooled = self.out.forward(&attn)?;
        let m = self.fc2.forward(
            &self
                .fc1
                .forward(&self.layernorm.forward(&pooled)?)?
                .gelu()?,
        )?;
        (pooled + m)?.reshape((b, h))
    }
}

/// The SigLIP vision transformer (`…vision_model`).
pub struct SiglipVision {
    cfg: SiglipVisionConfig,
    /// (hidden, channels·patch·patch): the patch convolution as a matrix.
    patch: Linear,
    /// (num_patches, hidden), f32
    position: Tensor,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    head: Option<PoolingHead>,
}

impl SiglipVision {
    /// Loads the tower whose tensors are named `{prefix}.embeddings…`, `{prefix}.encoder…`,
    /// `{prefix}.post_layernorm…` (and `{prefix}.head…` when `use_head`).
    pub(crate) fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        cfg: &SiglipVisionConfig,
        dtype: DType,
    ) -> Result<Self> {
        cfg.tower.check("vision_config")?;
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(Error::InvalidModel(format!(
                "vision_config.patch_size ({}) must divide image_size ({})",
                cfg.patch_size, cfg.image_size
            )));
        }
        let (h, c, p) = (cfg.tower.hidden_size, cfg.num_channels, cfg.patch_size);
        let conv = src.tensor(
            &format!("{prefix}.embeddings.patch_embedding.weight"),
            &[h, c, p, p],
            dtype,
        )?;
        let conv_b = src.tensor(
            &format!("{prefix}.embeddings.patch_embedding.bias"),
            &[h],
            DType::F32,
        )?;
        let patch = Linear::from_parts(conv.reshape((h, c * p * p))?, Some(conv_b));
        let position = src.tensor(
            &format!("{prefix}.embeddings.position_embedding.weight"),
            &[cfg.num_patches(), h],
            DType::F32,
        )?;
        let encoder = Encoder::load(src, &format!("{prefix}.encoder"), &cfg.tower, dtype)?;
        let post_layernorm = LayerNorm::load(
            src,
            &format!("{prefix}.post_layernorm"),
            h,
            cfg.tower.layer_norm_eps,
        )?;
        let head = if cfg.use_head {
            Some(PoolingHead::load(
                src,
                &format!("{prefix}.head"),
                &cfg.tower,
                dtype,
            )?)
        } else {
            None
        };
        Ok(SiglipVision {
            cfg: cfg.clone(),
            patch,
            position,
            encoder,
            post_layernorm,
            head,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &SiglipVisionConfig {
        &self.cfg
    }

    /// Pixels (B, channels, image_size, image_size), already normalized, → the patch states
    /// after `post_layernorm`, (B, num_patches, hidden): what Gemma 3 reads.
    pub fn forward(&self, pixels: &Tensor) -> CResult<Tensor> {
        let (b, c, hh, ww) = pixels.dims4()?;
        let (s, p) = (self.cfg.image_size, self.cfg.patch_size);
        if c != self.cfg.num_channels || hh != s || ww != s {
            candle_core::bail!(
                "pixels of shape {:?}, the tower takes ({b}, {}, {s}, {s})",
                pixels.dims(),
                self.cfg.num_channels
            );
        }
        let g = s / p;
        // Unfold non-overlapping patches: (B, C, g, p, g, p) → (B, g, g, C, p, p), rows in
        // the row-major grid order the convolution's flatten(2) gives.
        let patches = pixels
            .to_dtype(DType::F32)?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, c * p * p))?;
        let x = self
            .patch
            .forward(&patches)?
            .broadcast_add(&self.position)?;
        let x = self.encoder.forward(&x, None)?;
        self.post_layernorm.forward(&x)
    }

    /// Pixels → the pooled image embedding (B, hidden) by the attention-pooling head
    /// (unnormalized, as `get_image_features` returns it).
    pub fn pooled(&self, pixels: &Tensor) -> CResult<Tensor> {
        let states = self.forward(pixels)?;
        match &self.head {
            Some(head) => head.forward(&states),
            None => candle_core::bail!("this vision tower has no pooling head (vision_use_head)"),
        }
    }
}

/// Hyper-parameters of the text tower.
#[derive(Clone, Debug, PartialEq)]
pub struct SiglipTextConfig {
    /// The encoder's sizes.
    pub tower: SiglipTowerConfig,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `max_position_embeddings`: the fixed text length (64 for MedSigLIP).
    pub max_positions: usize,
    /// `projection_size` (defaults to `hidden_size`).
    pub projection_size: usize,
    /// `pad_token_id`, used to pad texts to `max_positions`.
    pub pad_token_id: u32,
}

/// The SigLIP text transformer (`text_model`).
pub struct SiglipText {
    cfg: SiglipTextConfig,
    /// (vocab, hidden), f32 rows looked up.
    token: Tensor,
    /// (max_positions, hidden), f32
    position: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    head: Linear,
}

impl SiglipText {
    pub(crate) fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        cfg: &SiglipTextConfig,
        dtype: DType,
    ) -> Result<Self> {
        cfg.tower.check("text_config")?;
        let h = cfg.tower.hidden_size;
        Ok(SiglipText {
            token: src.tensor(
                &format!("{prefix}.embeddings.token_embedding.weight"),
                &[cfg.vocab_size, h],
                DType::F32,
            )?,
            position: src.tensor(
                &format!("{prefix}.embeddings.position_embedding.weight"),
                &[cfg.max_positions, h],
                DType::F32,
            )?,
            encoder: Encoder::load(src, &format!("{prefix}.encoder"), &cfg.tower, dtype)?,
            final_layer_norm: LayerNorm::load(
                src,
                &format!("{prefix}.final_layer_norm"),
                h,
                cfg.tower.layer_norm_eps,
            )?,
            head: Linear::load(
                src,
                &format!("{prefix}.head"),
                cfg.projection_size,
                h,
                dtype,
                true,
            )?,
            cfg: cfg.clone(),
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &SiglipTextConfig {
        &self.cfg
    }

    /// Token ids (B, max_positions) → pooled text embeddings (B, projection_size),
    /// unnormalized: the last position's final state through `head`. `attention_mask`
    /// (B, L) of 1 (token) and 0 (padding) hides padded keys from every query, as
    /// `transformers` does when the processor returns a mask (its fast tokenizer does); the
    /// pooled position is still the last one.
    pub fn forward(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> CResult<Tensor> {
        let (b, l) = ids.dims2()?;
        let h = self.cfg.tower.hidden_size;
        let tokens = self
            .token
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, h))?;
        let x = tokens.broadcast_add(&self.position.narrow(0, 0, l)?)?;
        let mask = match attention_mask {
            Some(m) => {
                // 0 where visible, a large negative where padded (`transformers` uses the
                // dtype's minimum; -inf would give NaN for an all-padding row).
                let m = m.to_dtype(DType::F32)?;
                Some(((m - 1.0)? * 3.0e38)?.reshape((b, 1, 1, l))?)
            }
            None => None,
        };
        let x = self.encoder.forward(&x, mask.as_ref())?;
        let x = self.final_layer_norm.forward(&x)?;
        let last = x.narrow(1, l - 1, 1)?.reshape((b, h))?;
        self.head.forward(&last)
    }
}

/// Rows of `x` (B, d) scaled to unit L2 norm.
pub(crate) fn l2_normalize(x: &Tensor) -> CResult<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    x.broadcast_div(&norm)
}
