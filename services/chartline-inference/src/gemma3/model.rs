//! The Gemma 3 text transformer over quantized (GGUF) or dense (safetensors) weights.
//!
//! Per layer (as llama.cpp's gemma3 graph and Gemma's reference code):
//!
//! ```text
//! h = x + post_attn_norm(attn(attn_norm(x)))
//! y = h + post_ffw_norm(down(gelu_tanh(gate(ffn_norm(h))) * up(ffn_norm(h))))
//! ```
//!
//! with RMSNorm on queries and keys per head, NEOX-style RoPE (base 10 000 on sliding-window
//! layers, `rope.freq_base` with optional linear scaling on global ones), queries scaled by
//! `1/sqrt(query_pre_attn_scalar)`, and grouped-query attention computed without copying the
//! key/value heads. GGUF conversion already added Gemma's `+1` to every RMSNorm weight, so the
//! weights are used as stored (adding it again took greedy agreement with llama.cpp from 16/16
//! to 0/16 tokens); a loader for Hugging Face checkpoints must add 1 itself.
//!
//! The same model runs dense weights (the safetensors loader): matrices as
//! `QMatMul::Tensor` in f32 or bf16 and the embedding as a plain tensor
//! (`Embedding::Dense`), shared with the tied output projection. Activations, norms,
//! attention and the KV cache stay f32 whatever the weights are; a bf16 matrix multiplies a
//! bf16 copy of its input and the product comes back as f32 (see `project`). Quantized
//! weights take exactly the calls they always did.
//!
//! Two paths, the same computation: a chunk of tokens (prefill) runs on candle tensors, with
//! long chunks' attention in causal pieces ([`attend_causal_chunks`]); one new token on the
//! CPU (decoding) runs on plain f32 slices ([`Gemma3::forward_one`]) with reused buffers, the
//! projections that share an input in one pass over the worker pool, and attention over the
//! cache in place. They differ in summation order and in the exponentials (a vectorised exp
//! in the one-token attention and GELU, libm's in candle's), a few ulp per operation;
//! `tests/prefill.rs` checks that whole, chunked and token-by-token prefill give the same
//! logits (to 1e-3 with f32 weights) and the same greedy tokens with quantized ones.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Result, Storage, Tensor};

use super::config::Gemma3Config;
use super::kernels::{self, Q8Input, Q8Matrix, U4Matrix};
use super::kv_cache::KvCache;

/// cos/sin tables (max_positions, head_dim / 2) for one RoPE base and scale.
pub(crate) struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    device: Device,
}

impl Rope {
    pub(crate) fn new(
        head_dim: usize,
        base: f32,
        scale: f32,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                1.0 / f64::from(base).powf(2.0 * i as f64 / head_dim as f64) / f64::from(scale)
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let theta = p as f64 * f;
                cos.push(theta.cos() as f32);
                sin.push(theta.sin() as f32);
            }
        }
        Ok(Rope {
            cos,
            sin,
            half,
            device: device.clone(),
        })
    }

    /// The (cos, sin) rows of positions `pos .. pos + l`.
    fn rows(&self, pos: usize, l: usize) -> Result<(&[f32], &[f32])> {
        let range = pos * self.half..(pos + l) * self.half;
        match (self.cos.get(range.clone()), self.sin.get(range)) {
            (Some(c), Some(s)) => Ok((c, s)),
            _ => candle_core::bail!("RoPE tables end before position {}", pos + l),
        }
    }

    /// Rotates `x` of shape (1, L, heads, head_dim) for positions `pos .. pos + L`.
    fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let l = x.dim(1)?;
        let (cos, sin) = self.rows(pos, l)?;
        let cos = Tensor::from_slice(cos, (l, self.half), &self.device)?;
        let sin = Tensor::from_slice(sin, (l, self.half), &self.device)?;
        candle_nn::rotary_emb::rope_thd(&x.contiguous()?, &cos, &sin)
    }

    /// Rotates the heads of one position in place (`x` = heads × head_dim values), with the
    /// arithmetic of candle's `rope_thd`: `(a, b) → (a·cos − b·sin, a·sin + b·cos)` for
    /// `a = x[i]`, `b = x[i + head_dim/2]`.
    fn rotate(&self, x: &mut [f32], pos: usize) -> Result<()> {
        let (cos, sin) = self.rows(pos, 1)?;
        for head in x.chunks_exact_mut(2 * self.half) {
            let (a, b) = head.split_at_mut(self.half);
            for (((a, b), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (x1, x2) = (*a, *b);
                *a = x1 * c - x2 * s;
                *b = x1 * s + x2 * c;
            }
        }
        Ok(())
    }
}

/// The token embedding table.
pub(crate) enum Embedding {
    /// (vocab, hidden) quantized blocks (GGUF): looked-up rows are dequantized to f32.
    Quantized(Arc<QTensor>),
    /// (vocab, hidden) Q8_0 blocks repacked for Chartline's kernels, shared with the tied
    /// output projection: rows are dequantized exactly as candle does.
    Q8(Arc<Q8Matrix>),
    /// (vocab, hidden) plain f32 or bf16 tensor (safetensors): looked-up rows become f32.
    Dense(Tensor),
}

impl From<Arc<QTensor>> for Embedding {
    fn from(t: Arc<QTensor>) -> Self {
        Embedding::Quantized(t)
    }
}

impl Embedding {
    /// f32 rows for `ids`, shape `ids.dims() + (hidden,)`.
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::Q8(m) => {
                let rows = m.rows(&ids.to_vec1::<u32>()?)?;
                Tensor::from_vec(rows, (ids.elem_count(), m.dims().1), ids.device())
            }
            Embedding::Dense(w) => w.index_select(ids, 0)?.to_dtype(DType::F32),
        }
    }
}

/// A weight matrix (out × in): candle's (quantized or dense) or Q8_0 repacked for
/// Chartline's own CPU kernels (see `kernels`).
pub(crate) enum Weight {
    Candle(QMatMul),
    Q8(Arc<Q8Matrix>),
    /// Q4_K repacked for Chartline's kernels, with candle's matrix for products of several
    /// rows where candle's AVX-512 VNNI tiles are the faster ones (see
    /// `kernels::wide_k_quants`).
    U4(Arc<U4Matrix>, Option<QMatMul>),
}

impl From<QMatMul> for Weight {
    fn from(m: QMatMul) -> Self {
        Weight::Candle(m)
    }
}

/// An activation tensor (.., in) with its Q8_0 quantization made at most once, so the
/// projections that read the same input (query/key/value, gate/up) share it.
struct Input<'a> {
    x: &'a Tensor,
    q8: std::cell::OnceCell<Q8Input>,
}

impl<'a> Input<'a> {
    fn new(x: &'a Tensor) -> Self {
        Input {
            x,
            q8: std::cell::OnceCell::new(),
        }
    }

    /// `x @ wᵀ`. A dense weight stored in another float type than the (f32) activations,
    /// i.e. bf16, multiplies a copy of `x` in its own type and the product is converted
    /// back; every other candle weight (quantized, or dense of the activations' type) is
    /// applied as is; a Q8_0 matrix multiplies the shared quantized input.
    fn project(&self, w: &Weight) -> Result<Tensor> {
        match w {
            Weight::Candle(m @ QMatMul::Tensor(t)) if t.dtype() != self.x.dtype() => m
                .forward(&self.x.to_dtype(t.dtype())?)?
                .to_dtype(self.x.dtype()),
            Weight::Candle(m) => m.forward(self.x),
            Weight::Q8(m) => {
                let out = self.q8_product(m)?;
                self.shaped(out, m.dims().0)
            }
            Weight::U4(_, Some(wide)) if self.x.elem_count() > self.x.dim(D::Minus1)? => {
                wide.forward(self.x)
            }
            Weight::U4(m, _) => {
                // K-quant weights take Q8_K activations, as llama.cpp multiplies them.
                let (n, k) = m.dims();
                let data = self
                    .x
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let q = Q8Input::quantize_k(&data, self.x.elem_count() / k, k)?;
                let mut out = vec![0f32; q.rows() * n];
                m.matmul(&q, &mut out)?;
                self.shaped(out, n)
            }
        }
    }

    /// The input quantized to Q8_0 rows of `k` values (once).
    fn quantized(&self, k: usize) -> Result<&Q8Input> {
        if let Some(q) = self.q8.get() {
            return Ok(q);
        }
        let rows = self.x.elem_count() / k;
        let data = self
            .x
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let q = Q8Input::quantize(&data, rows, k)?;
        Ok(self.q8.get_or_init(|| q))
    }

    /// `x @ mᵀ` as rows of `m`'s output width.
    fn q8_product(&self, m: &Q8Matrix) -> Result<Vec<f32>> {
        let (n, k) = m.dims();
        let q = self.quantized(k)?;
        let mut out = vec![0f32; q.rows() * n];
        m.matmul(q, &mut out)?;
        Ok(out)
    }

    /// Output rows as a tensor of `x`'s shape with the last dimension `n`.
    fn shaped(&self, out: Vec<f32>, n: usize) -> Result<Tensor> {
        let mut dims = self.x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Tensor::from_vec(out, dims, self.x.device())
    }
}

/// `x @ wᵀ` for one weight (see [`Input::project`]).
fn project(w: &Weight, x: &Tensor) -> Result<Tensor> {
    Input::new(x).project(w)
}

pub(crate) struct Layer {
    pub wq: Weight,
    pub wk: Weight,
    pub wv: Weight,
    pub wo: Weight,
    pub q_norm: Tensor,
    pub k_norm: Tensor,
    pub attn_norm: Tensor,
    pub post_attn_norm: Tensor,
    pub ffn_norm: Tensor,
    pub post_ffn_norm: Tensor,
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
}

/// The Gemma 3 text model with its KV cache: one sequence at a time.
pub struct Gemma3 {
    cfg: Gemma3Config,
    /// (vocab, hidden), usually Q8_0 (GGUF) or bf16 (safetensors): rows are converted to f32
    /// for lookups, and the same data is the (tied) output projection.
    embed: Embedding,
    lm_head: Weight,
    layers: Vec<Layer>,
    final_norm: Tensor,
    rope_local: Rope,
    rope_global: Rope,
    caches: Vec<KvCache>,
    max_positions: usize,
    prefill_chunk: usize,
    device: Device,
    /// The vision tower and projector of a multimodal checkpoint.
    vision: Option<Box<super::multimodal::Vision>>,
    /// f32 copies of the norm weights for one-token steps on plain slices (CPU only; see
    /// [`Gemma3::forward_one`]).
    step_norms: Option<StepNorms>,
    /// Buffers reused by one-token steps.
    scratch: Scratch,
}

/// RMSNorm weights as f32 slices: per layer, then the final norm.
struct StepNorms {
    layers: Vec<LayerNorms>,
    last: Vec<f32>,
}

struct LayerNorms {
    attn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    post_attn: Vec<f32>,
    ffn: Vec<f32>,
    post_ffn: Vec<f32>,
}

/// Working buffers of a one-token step (sized on first use).
#[derive(Default)]
struct Scratch {
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
    /// Per range of keys: each head's max score, sum of exponentials and weighted values.
    parts: Vec<f32>,
}

fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl Gemma3 {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: Gemma3Config,
        embed: impl Into<Embedding>,
        lm_head: impl Into<Weight>,
        layers: Vec<Layer>,
        final_norm: Tensor,
        max_positions: usize,
        prefill_chunk: usize,
        device: &Device,
    ) -> Result<Self> {
        let rope_local = Rope::new(
            cfg.head_dim,
            cfg.rope_base_local,
            1.0,
            max_positions,
            device,
        )?;
        let rope_global = Rope::new(
            cfg.head_dim,
            cfg.rope_base_global,
            cfg.rope_scale_global,
            max_positions,
            device,
        )?;
        let caches = (0..cfg.n_layers)
            .map(|i| {
                let window = if cfg.is_global(i) {
                    None
                } else {
                    cfg.sliding_window
                };
                KvCache::new(window, max_positions)
            })
            .collect();
        let step_norms = if device.is_cpu() {
            let layers = layers
                .iter()
                .map(|l| {
                    Ok(LayerNorms {
                        attn: f32_values(&l.attn_norm)?,
                        q: f32_values(&l.q_norm)?,
                        k: f32_values(&l.k_norm)?,
                        post_attn: f32_values(&l.post_attn_norm)?,
                        ffn: f32_values(&l.ffn_norm)?,
                        post_ffn: f32_values(&l.post_ffn_norm)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(StepNorms {
                layers,
                last: f32_values(&final_norm)?,
            })
        } else {
            None
        };
        Ok(Gemma3 {
            step_norms,
            scratch: Scratch::default(),
            cfg,
            embed: embed.into(),
            lm_head: lm_head.into(),
            layers,
            final_norm,
            rope_local,
            rope_global,
            caches,
            max_positions,
            prefill_chunk,
            device: device.clone(),
            vision: None,
        })
    }

    /// Attaches a vision tower and projector (a multimodal checkpoint).
    pub(crate) fn set_vision(&mut self, vision: super::multimodal::Vision) {
        self.vision = Some(Box::new(vision));
    }

    /// The vision side, when the checkpoint has one.
    pub(crate) fn vision(&self) -> Option<&super::multimodal::Vision> {
        self.vision.as_deref()
    }

    /// The device the model runs on.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &Gemma3Config {
        &self.cfg
    }

    /// Most positions (prompt plus output) one sequence may use.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Prompt tokens per forward pass during prefill.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// Forgets the current sequence.
    pub fn clear(&mut self) {
        self.caches.iter_mut().for_each(KvCache::clear);
    }

    /// Position the next token will take.
    pub fn next_pos(&self) -> usize {
        self.caches.first().map(KvCache::next_pos).unwrap_or(0)
    }

    /// Runs `tokens` as positions `pos ..` of the current sequence (`pos` must equal
    /// [`next_pos`](Self::next_pos); 0 starts a new sequence) and returns the logits of the
    /// last one.
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        self.forward_with_images(tokens, pos, &[], &[])
    }

    /// As [`forward`](Self::forward), with image soft tokens: each `(offset, features)` of
    /// `images` replaces the embeddings of `tokens[offset .. offset + T]` by `features`
    /// (T, hidden) (image features are not scaled by `sqrt(hidden)`; text embeddings are),
    /// and positions inside one of `spans` (absolute `[start, end)`) also see every later
    /// position of the same span: attention is bidirectional inside each image and causal
    /// (and windowed on sliding layers) elsewhere. A span must lie inside this call's
    /// positions.
    pub(crate) fn forward_with_images(
        &mut self,
        tokens: &[u32],
        pos: usize,
        images: &[(usize, Tensor)],
        spans: &[(usize, usize)],
    ) -> Result<Vec<f32>> {
        let l = tokens.len();
        if l == 0 {
            candle_core::bail!("forward needs at least one token");
        }
        if pos + l > self.max_positions {
            candle_core::bail!(
                "positions up to {} exceed the {} prepared",
                pos + l,
                self.max_positions
            );
        }
        if pos == 0 {
            self.clear();
        }
        for &(s, e) in spans {
            if s < pos || e > pos + l || s >= e {
                candle_core::bail!(
                    "image span {s}..{e} is not inside positions {pos}..{}",
                    pos + l
                );
            }
        }
        // One new token on the CPU takes the path on slices; its attention handles up to
        // `MAX_HEADS` query heads per key/value head (Gemma 3 has at most 4).
        if let ([token], true, true, true, true) = (
            tokens,
            images.is_empty(),
            spans.is_empty(),
            self.step_norms.is_some(),
            self.cfg.group_size() <= kernels::MAX_HEADS,
        ) {
            return self.forward_one(*token, pos);
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = (self.embed.lookup(&ids)? * (self.cfg.hidden_size as f64).sqrt())?;
        if !images.is_empty() {
            x = splice_rows(&x, images)?;
        }
        let mut x = x.reshape((1, l, self.cfg.hidden_size))?;
        let mask_cache = MaskCache {
            spans: spans.to_vec(),
            ..MaskCache::default()
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let global = self.cfg.is_global(i);
            let rope = if global {
                &self.rope_global
            } else {
                &self.rope_local
            };
            let window = if global {
                None
            } else {
                self.cfg.sliding_window
            };
            x = layer_forward(
                &self.cfg,
                layer,
                &x,
                pos,
                rope,
                window,
                &mut self.caches[i],
                &mask_cache,
            )?;
        }
        let last = x.narrow(1, l - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.final_norm, self.cfg.rms_eps as f32)?;
        let mut logits = project(&self.lm_head, &last)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
    }

    /// One new token (decoding) on the CPU, on plain f32 slices: the same arithmetic as the
    /// general path (norms, RoPE and residuals written out as candle computes them), without
    /// the ~35 tensor operations per layer whose set-up costs more than their work for one
    /// row. Projections that read the same input share one quantization and one pass over
    /// the worker pool ([`project_into`]), and attention runs over the cached keys and
    /// values in place ([`attend_step`]).
    fn forward_one(&mut self, token: u32, pos: usize) -> Result<Vec<f32>> {
        let Some(norms) = &self.step_norms else {
            candle_core::bail!("one-token steps need the model on the CPU");
        };
        let cfg = &self.cfg;
        let eps = cfg.rms_eps as f32;
        let (nh, nkv, hd, vd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.value_dim);
        let hidden = cfg.hidden_size;
        let s = &mut self.scratch;
        let mut x = match &self.embed {
            Embedding::Q8(m) => m.rows(&[token])?,
            embed => f32_values(&embed.lookup(&Tensor::new(&[token], &self.device)?)?)?,
        };
        if x.len() != hidden {
            candle_core::bail!(
                "embedding row of {} values for hidden size {hidden}",
                x.len()
            );
        }
        let scale = (hidden as f64).sqrt() as f32;
        x.iter_mut().for_each(|v| *v *= scale);
        let q_scale = (1.0 / cfg.query_pre_attn_scalar.sqrt()) as f32;
        for (i, (layer, n)) in self.layers.iter().zip(&norms.layers).enumerate() {
            let global = cfg.is_global(i);
            let (rope, window) = if global {
                (&self.rope_global, None)
            } else {
                (&self.rope_local, cfg.sliding_window)
            };
            rms_norm_into(&x, &n.attn, eps, &mut s.h);
            project_into(
                &s.h,
                &mut [
                    (&layer.wq, &mut s.q, nh * hd),
                    (&layer.wk, &mut s.k, nkv * hd),
                    (&layer.wv, &mut s.v, nkv * vd),
                ],
            )?;
            for head in s.q.chunks_exact_mut(hd) {
                rms_norm_in_place(head, &n.q, eps);
            }
            for head in s.k.chunks_exact_mut(hd) {
                rms_norm_in_place(head, &n.k, eps);
            }
            rope.rotate(&mut s.q, pos)?;
            s.q.iter_mut().for_each(|v| *v *= q_scale);
            rope.rotate(&mut s.k, pos)?;
            let kv = self.caches[i].append_one(&s.k, &s.v, nkv, pos)?;
            let first_visible = window
                .map_or(0, |w| (pos + 1).saturating_sub(w))
                .max(kv.start);
            let skip = first_visible - kv.start;
            let t = kv.k.dim(2)? - skip;
            s.attn.resize(nh * vd, 0.0);
            if !attend_step(
                &s.q,
                &kv.k.narrow(2, skip, t)?,
                &kv.v.narrow(2, skip, t)?,
                cfg.group_size(),
                &mut s.attn,
                &mut s.parts,
            )? {
                candle_core::bail!(
                    "one-token attention cannot take this cache ({nh} heads over {nkv}, \
                     {hd}/{vd} wide)"
                );
            }
            project_into(&s.attn, &mut [(&layer.wo, &mut s.o, hidden)])?;
            add_rms_norm(&mut x, &s.o, &n.post_attn, eps);

            rms_norm_into(&x, &n.ffn, eps, &mut s.h);
            let ffn = cfg.ffn_dim;
            project_into(
                &s.h,
                &mut [(&layer.gate, &mut s.gate, ffn), (&layer.up, &mut s.up, ffn)],
            )?;
            kernels::gelu_tanh_mul(&mut s.gate, &s.up);
            project_into(&s.gate, &mut [(&layer.down, &mut s.down, hidden)])?;
            add_rms_norm(&mut x, &s.down, &n.post_ffn, eps);
        }
        rms_norm_into(&x, &norms.last, eps, &mut s.h);
        let vocab = self.cfg.vocab_size;
        let mut logits = Vec::new();
        project_into(&s.h, &mut [(&self.lm_head, &mut logits, vocab)])?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            let (inv, cap) = ((1.0 / cap) as f32, cap as f32);
            logits.iter_mut().for_each(|v| *v = (*v * inv).tanh() * cap);
        }
        Ok(logits)
    }
}

/// (first query position, first key position, key count, window).
type MaskKey = (usize, usize, usize, Option<usize>);

/// Masks are the same for every layer of one kind within a forward pass.
#[derive(Default)]
struct MaskCache {
    masks: std::cell::RefCell<Vec<(MaskKey, Tensor)>>,
    /// Image spans (absolute `[start, end)`) with bidirectional attention inside.
    spans: Vec<(usize, usize)>,
}

/// Replaces rows of `x` (L, hidden): each `(offset, rows)` puts `rows` (T, hidden) at
/// `offset .. offset + T`. Offsets must be increasing and the blocks disjoint.
fn splice_rows(x: &Tensor, blocks: &[(usize, Tensor)]) -> Result<Tensor> {
    let (l, _) = x.dims2()?;
    let mut pieces = Vec::with_capacity(2 * blocks.len() + 1);
    let mut at = 0;
    for (offset, rows) in blocks {
        let t = rows.dim(0)?;
        if *offset < at || offset + t > l {
            candle_core::bail!(
                "image features at {offset}..{} overlap or overrun {l} tokens",
                offset + t
            );
        }
        if *offset > at {
            pieces.push(x.narrow(0, at, offset - at)?);
        }
        pieces.push(rows.to_dtype(x.dtype())?);
        at = offset + t;
    }
    if at < l {
        pieces.push(x.narrow(0, at, l - at)?);
    }
    Tensor::cat(&pieces, 0)
}

impl MaskCache {
    /// Additive mask (L, T) for queries at `pos ..` and keys at `key_start ..`.
    fn get(
        &self,
        l: usize,
        pos: usize,
        key_start: usize,
        t: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let key = (pos, key_start, t, window);
        if let Some((_, m)) = self.masks.borrow().iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let mut data = Vec::with_capacity(l * t);
        for i in 0..l {
            let q = pos + i;
            for j in 0..t {
                let k = key_start + j;
                let causal = k <= q && window.is_none_or(|w| q - k < w);
                // Union with the image block, as `transformers` ORs its image mask into
                // both the full and the sliding-window causal masks.
                let same_image = self
                    .spans
                    .iter()
                    .any(|&(s, e)| (s..e).contains(&q) && (s..e).contains(&k));
                let visible = causal || same_image;
                data.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
            }
        }
        let m = Tensor::from_vec(data, (l, t), device)?;
        self.masks.borrow_mut().push((key, m.clone()));
        Ok(m)
    }
}

#[allow(clippy::too_many_arguments)]
fn layer_forward(
    cfg: &Gemma3Config,
    w: &Layer,
    x: &Tensor,
    pos: usize,
    rope: &Rope,
    window: Option<usize>,
    cache: &mut KvCache,
    masks: &MaskCache,
) -> Result<Tensor> {
    let eps = cfg.rms_eps as f32;
    let (_, l, _) = x.dims3()?;
    let (nh, nkv, hd, vd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.value_dim);
    let g = cfg.group_size();

    let h = candle_nn::ops::rms_norm(x, &w.attn_norm, eps)?;
    let h = Input::new(&h);
    // (1, L, heads, head_dim)
    let q = h.project(&w.wq)?.reshape((1, l, nh, hd))?;
    let k = h.project(&w.wk)?.reshape((1, l, nkv, hd))?;
    let v = h.project(&w.wv)?.reshape((1, l, nkv, vd))?;
    let q = candle_nn::ops::rms_norm(&q, &w.q_norm, eps)?;
    let k = candle_nn::ops::rms_norm(&k, &w.k_norm, eps)?;
    let q = (rope.apply(&q, pos)? * (1.0 / cfg.query_pre_attn_scalar.sqrt()))?;
    let k = rope.apply(&k, pos)?;
    // (1, heads, L, d)
    let q = q.transpose(1, 2)?.contiguous()?;
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;

    let kv = cache.append(&k, &v, pos)?;
    // Keys older than the first query's window are invisible to the whole chunk.
    let first_visible = window
        .map_or(0, |w| (pos + 1).saturating_sub(w))
        .max(kv.start);
    let skip = first_visible - kv.start;
    let t = kv.k.dim(2)? - skip;
    let keys = kv.k.narrow(2, skip, t)?;
    let values = kv.v.narrow(2, skip, t)?;

    let attn = match attend_one(&q, &keys, &values, g)? {
        Some(attn) => attn,
        None if l > ATTENTION_CHUNK => {
            attend_causal_chunks(&q, &kv, masks, (l, pos, first_visible, window))?
        }
        None => attend(&q, &keys, &values, masks, (l, pos, first_visible, window))?,
    };
    let attn = project(&w.wo, &attn)?;
    let h = (x + candle_nn::ops::rms_norm(&attn, &w.post_attn_norm, eps)?)?;

    let f = candle_nn::ops::rms_norm(&h, &w.ffn_norm, eps)?;
    let f = Input::new(&f);
    let act = match (&w.gate, &w.up) {
        (Weight::Q8(gate), Weight::Q8(up)) => {
            let mut g = f.q8_product(gate)?;
            kernels::gelu_tanh_mul(&mut g, &f.q8_product(up)?);
            f.shaped(g, gate.dims().0)?
        }
        _ => (f.project(&w.gate)?.gelu()? * f.project(&w.up)?)?,
    };
    let down = project(&w.down, &act)?;
    let y = (h + candle_nn::ops::rms_norm(&down, &w.post_ffn_norm, eps)?)?;
    debug_assert_eq!(y.dim(D::Minus1).ok(), Some(cfg.hidden_size));
    Ok(y)
}

/// Queries per piece of a long prefill's attention (see [`attend_causal_chunks`]).
const ATTENTION_CHUNK: usize = 128;

/// [`attend`] for a long chunk of queries, [`ATTENTION_CHUNK`] queries at a time, each
/// piece over only the keys it can see: causality hides every later key, so the products
/// and the softmax shrink to about `(n + 1) / 2n` of the whole for `n` pieces (5/8 for a
/// 512-token prompt). Keys inside an image span that runs past a piece stay visible to it.
fn attend_causal_chunks(
    q: &Tensor,
    kv: &super::kv_cache::CachedKv,
    masks: &MaskCache,
    (l, pos, first_visible, window): (usize, usize, usize, Option<usize>),
) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(l.div_ceil(ATTENTION_CHUNK));
    for c0 in (0..l).step_by(ATTENTION_CHUNK) {
        let lc = ATTENTION_CHUNK.min(l - c0);
        let qpos = pos + c0;
        // Image spans the piece's queries overlap: their keys are visible to them even
        // past the window (earlier) or past causality (later).
        let overlapping = || {
            masks
                .spans
                .iter()
                .filter(move |&&(s, e)| s < qpos + lc && e > qpos)
        };
        let visible_from = overlapping()
            .map(|&(s, _)| s)
            .fold(
                window.map_or(0, |w| (qpos + 1).saturating_sub(w)),
                usize::min,
            )
            .max(first_visible);
        let end = overlapping().map(|&(_, e)| e).fold(qpos + lc, usize::max);
        let (skip, t) = (visible_from - kv.start, end - visible_from);
        let qc = q.narrow(2, c0, lc)?.contiguous()?;
        parts.push(attend(
            &qc,
            &kv.k.narrow(2, skip, t)?,
            &kv.v.narrow(2, skip, t)?,
            masks,
            (lc, qpos, visible_from, window),
        )?);
    }
    Tensor::cat(&parts, 1)
}

/// Attention of queries (1, nh, L, hd) over visible keys (1, nkv, T, hd) and values
/// (1, nkv, T, vd), masked for the chunk's positions: (1, L, nh·vd).
fn attend(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    masks: &MaskCache,
    (l, pos, first_visible, window): (usize, usize, usize, Option<usize>),
) -> Result<Tensor> {
    let (_, nh, _, hd) = q.dims4()?;
    let (_, nkv, t, vd) = values.dims4()?;
    let g = nh / nkv;
    // Query heads of one KV group are adjacent, so (1, nh, L, hd) reads as
    // (1, nkv, g*L, hd) and each group multiplies its one K/V head directly.
    let q = q.reshape((1, nkv, g * l, hd))?;
    let scores = q.matmul(&keys.t()?)?; // (1, nkv, g*L, T)
    let needs_mask = l > 1 || window.is_some_and(|w| t > w);
    let scores = if needs_mask {
        let mask = masks.get(l, pos, first_visible, t, window, q.device())?;
        scores
            .reshape((1, nkv, g, l, t))?
            .broadcast_add(&mask)?
            .reshape((1, nkv, g * l, t))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let attn = probs.matmul(values)?; // (1, nkv, g*L, vd)
    let attn = attn
        .reshape((1, nh, l, vd))?
        .transpose(1, 2)?
        .reshape((1, l, nh * vd))?;
    Ok(attn)
}

/// Row `j` (`d` values) of cached keys or values starting at `base`, `stride` apart.
fn cached_row(data: &[f32], base: usize, stride: usize, j: usize, d: usize) -> Result<&[f32]> {
    data.get(base + j * stride..base + j * stride + d)
        .ok_or_else(|| candle_core::Error::Msg("cached row outside its storage".into()))
}

/// Keys per work item of one-token attention. Fixed, so that the sums (and the logits) do
/// not depend on the number of threads.
const KEYS_PER_ITEM: usize = 64;

/// Attention of one new token (L = 1) over tensors: [`attend_step`] on the query's values.
/// `None` when the tensors are not plain CPU f32 with contiguous rows (candle's path then
/// runs).
fn attend_one(q: &Tensor, keys: &Tensor, values: &Tensor, g: usize) -> Result<Option<Tensor>> {
    let (_, nh, l, _) = q.dims4()?;
    let (_, nkv, _, vd) = values.dims4()?;
    if l != 1 || !q.device().is_cpu() || q.dtype() != DType::F32 || nh != nkv * g {
        return Ok(None);
    }
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; nh * vd];
    if !attend_step(&q, keys, values, g, &mut out, &mut Vec::new())? {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(out, (1, 1, nh * vd), &Device::Cpu)?))
}

/// Attention of one new token on the CPU with Chartline's f32 kernels: queries `q`
/// (heads × head_dim, heads of one key/value group adjacent) over every cached key
/// (1, nkv, T, head_dim) and value (1, nkv, T, value_dim) given (the caller drops keys
/// outside the window, so no mask), into `out` (heads × value_dim).
///
/// One pass over candle's worker pool: each work item takes one group's keys in a fixed
/// range of [`KEYS_PER_ITEM`], reads each key and value row once for all the query heads
/// that share it, and keeps per head its largest score, the sum of `exp(score − largest)`
/// and the weighted sum of values (`parts`, reused between calls). The items are then
/// combined in order, rescaled to the overall largest score: the softmax-weighted sum of
/// values, with sums that do not depend on the number of threads. Returns `false` when it
/// cannot take the input (tensors not plain CPU f32 with contiguous rows, more than
/// [`kernels::MAX_HEADS`] query heads per key/value head, shapes that do not agree).
// Keys are indexed across the heads' score rows ([head][key]); an iterator per row would
// not read better.
#[allow(clippy::needless_range_loop)]
fn attend_step(
    q: &[f32],
    keys: &Tensor,
    values: &Tensor,
    g: usize,
    out: &mut [f32],
    parts: &mut Vec<f32>,
) -> Result<bool> {
    use std::sync::{Mutex, PoisonError};
    let (_, nkv, t, hd) = keys.dims4()?;
    let vd = values.dim(3)?;
    if t == 0
        || g == 0
        || g > kernels::MAX_HEADS
        || values.dim(2)? != t
        || q.len() != nkv * g * hd
        || out.len() != nkv * g * vd
        || keys.dtype() != DType::F32
        || values.dtype() != DType::F32
    {
        return Ok(false);
    }
    let (key_storage, kl) = keys.storage_and_layout();
    let (value_storage, vl) = values.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*key_storage, &*value_storage) else {
        return Ok(false);
    };
    let (Ok(kdata), Ok(vdata)) = (kc.as_slice::<f32>(), vc.as_slice::<f32>()) else {
        return Ok(false);
    };
    let (ks, vs) = (kl.stride(), vl.stride());
    if ks.len() != 4 || vs.len() != 4 || ks[3] != 1 || vs[3] != 1 {
        return Ok(false);
    }
    let items = t.div_ceil(KEYS_PER_ITEM);
    // Per item: max score per head, sum of exponentials per head, weighted values per head.
    let part = g * (2 + vd);
    parts.clear();
    parts.resize(nkv * items * part, 0.0);
    let pieces: Vec<Mutex<&mut [f32]>> = parts.chunks_mut(part).map(Mutex::new).collect();
    let failed = Mutex::new(None);
    candle_core::utils::barrier_pool().execute_chunked(nkv * items, |range| {
        // Scores of the item's keys, [head][key].
        let mut scores = [[0f32; KEYS_PER_ITEM]; kernels::MAX_HEADS];
        let mut s = [0f32; kernels::MAX_HEADS];
        for c in range {
            let (kv, item) = (c / items, c % items);
            let qg = &q[kv * g * hd..(kv + 1) * g * hd];
            let (kbase, vbase) = (
                kl.start_offset() + kv * ks[1],
                vl.start_offset() + kv * vs[1],
            );
            let first = item * KEYS_PER_ITEM;
            let n = KEYS_PER_ITEM.min(t - first);
            let mut piece = pieces[c].lock().unwrap_or_else(PoisonError::into_inner);
            let (stats, acc) = piece.split_at_mut(2 * g);
            for i in 0..n {
                match cached_row(kdata, kbase, ks[2], first + i, hd) {
                    Ok(k) => kernels::dots(qg, k, &mut s[..g]),
                    Err(e) => {
                        *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                        return;
                    }
                }
                for (h, &v) in s[..g].iter().enumerate() {
                    scores[h][i] = v;
                }
            }
            for (h, row) in scores[..g].iter_mut().enumerate() {
                let row = &mut row[..n];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                stats[g + h] = kernels::exp_shifted_sum(row, max);
                stats[h] = max;
            }
            for i in 0..n {
                match cached_row(vdata, vbase, vs[2], first + i, vd) {
                    Ok(v) => {
                        for (h, p) in s[..g].iter_mut().enumerate() {
                            *p = scores[h][i];
                        }
                        kernels::axpys(acc, &s[..g], v);
                    }
                    Err(e) => {
                        *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                        return;
                    }
                }
            }
        }
    });
    drop(pieces);
    if let Some(e) = failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(e);
    }
    for (kv, out) in out.chunks_exact_mut(g * vd).enumerate() {
        let group = &parts[kv * items * part..(kv + 1) * items * part];
        for (h, out) in out.chunks_exact_mut(vd).enumerate() {
            let max = group
                .chunks_exact(part)
                .map(|p| p[h])
                .fold(f32::NEG_INFINITY, f32::max);
            out.fill(0.0);
            let mut total = 0f32;
            for p in group.chunks_exact(part) {
                let w = (p[h] - max).exp();
                total += w * p[g + h];
                for (o, a) in out.iter_mut().zip(&p[2 * g + h * vd..2 * g + (h + 1) * vd]) {
                    *o += w * a;
                }
            }
            out.iter_mut().for_each(|o| *o /= total);
        }
    }
    Ok(true)
}

/// `out = rms_norm(x) · w`, as candle's `rms_norm`: `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let m = rms(x, eps);
    out.clear();
    out.extend(x.iter().zip(w).map(|(v, w)| v / m * w));
}

/// [`rms_norm_into`] in place.
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let m = rms(x, eps);
    x.iter_mut().zip(w).for_each(|(v, w)| *v = *v / m * w);
}

/// `x += rms_norm(y) · w` (a residual connection after a normed branch).
fn add_rms_norm(x: &mut [f32], y: &[f32], w: &[f32], eps: f32) {
    let m = rms(y, eps);
    x.iter_mut()
        .zip(y.iter().zip(w))
        .for_each(|(x, (v, w))| *x += v / m * w);
}

/// `sqrt(mean(x²) + eps)`, summed in order as candle does.
fn rms(x: &[f32], eps: f32) -> f32 {
    let sum2 = x.iter().map(|v| v * v).sum::<f32>();
    (sum2 / x.len() as f32 + eps).sqrt()
}

/// `out_j = x · w_jᵀ` (`n_j` values each) for weights that read the same one-row input:
/// the input is quantized once per kind the weights need (Q8_0, Q8_K) and Chartline's
/// matrices are multiplied in one pass over the worker pool ([`kernels::matvecs`]); a
/// candle weight takes the tensor path.
fn project_into(x: &[f32], jobs: &mut [(&Weight, &mut Vec<f32>, usize)]) -> Result<()> {
    let k = x.len();
    let needs = |kind: fn(&Weight) -> bool| jobs.iter().any(|(w, ..)| kind(w));
    let x8 = if needs(|w| matches!(w, Weight::Q8(_))) {
        Some(Q8Input::quantize(x, 1, k)?)
    } else {
        None
    };
    let xk = if needs(|w| matches!(w, Weight::U4(..))) {
        Some(Q8Input::quantize_k(x, 1, k)?)
    } else {
        None
    };
    let mut packed = Vec::with_capacity(jobs.len());
    for (w, out, n) in jobs.iter_mut() {
        out.resize(*n, 0.0);
        match w {
            Weight::Q8(m) => packed.push((kernels::Packed::Q8(m), out.as_mut_slice())),
            Weight::U4(m, _) => packed.push((kernels::Packed::U4(m), out.as_mut_slice())),
            Weight::Candle(_) => {
                let y = project(w, &Tensor::from_slice(x, (1, k), &Device::Cpu)?)?;
                let y = y.flatten_all()?.to_vec1::<f32>()?;
                if y.len() != *n {
                    candle_core::bail!("projection gave {} values, {n} expected", y.len());
                }
                out.copy_from_slice(&y);
            }
        }
    }
    kernels::matvecs(x8.as_ref(), xk.as_ref(), &mut packed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn visible(mask: &Tensor) -> Vec<Vec<bool>> {
        mask.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|row| row.into_iter().map(|v| v == 0.0).collect())
            .collect()
    }

    /// Deterministic values in [-1, 1).
    fn noise(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn attention_in_causal_pieces_equals_the_whole_masked_product() {
        // 300 queries (three pieces of 128, 128 and 44) after 50 cached positions, with an
        // image span that crosses a piece boundary, with and without a sliding window.
        let (nh, nkv, hd, l, pos) = (4, 1, 16, 300, 50);
        let t = pos + l;
        let q = noise((1, nh, l, hd), 1);
        let kv = super::super::kv_cache::CachedKv {
            k: noise((1, nkv, t, hd), 2),
            v: noise((1, nkv, t, hd), 3),
            start: 0,
        };
        for (window, spans) in [
            (None, vec![(pos + 120, pos + 140)]),
            (Some(100), vec![(pos + 120, pos + 140)]),
            // An image longer than the window: its first keys stay visible to its last
            // queries, two pieces later.
            (Some(100), vec![(pos + 20, pos + 270)]),
            (Some(100), vec![]),
        ] {
            let masks = MaskCache {
                spans: spans.clone(),
                ..MaskCache::default()
            };
            let first_visible = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let whole = attend(
                &q,
                &kv.k.narrow(2, first_visible, t - first_visible).unwrap(),
                &kv.v.narrow(2, first_visible, t - first_visible).unwrap(),
                &masks,
                (l, pos, first_visible, window),
            )
            .unwrap();
            let pieces =
                attend_causal_chunks(&q, &kv, &masks, (l, pos, first_visible, window)).unwrap();
            let diff = (whole - pieces)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "window {window:?} spans {spans:?}: {diff}");
        }
    }

    #[test]
    fn attention_is_bidirectional_inside_an_image_and_causal_elsewhere() {
        // Positions 0..8 with an image at 2..6.
        let masks = MaskCache {
            spans: vec![(2, 6)],
            ..MaskCache::default()
        };
        let full = visible(&masks.get(8, 0, 0, 8, None, &Device::Cpu).unwrap());
        for (q, row) in full.iter().enumerate() {
            for (k, &seen) in row.iter().enumerate() {
                let in_image = (2..6).contains(&q) && (2..6).contains(&k);
                assert_eq!(seen, k <= q || in_image, "full layer, q {q} k {k}");
            }
        }
        // Image tokens see later image tokens; text before the image does not.
        assert!(full[2][5]);
        assert!(!full[1][3]);
        // Text after the image sees the whole image, causally.
        assert!(full[6][2] && full[6][5] && !full[6][7]);

        // Sliding window of 2: the image block is a union with the windowed causal mask.
        let windowed = visible(&masks.get(8, 0, 0, 8, Some(2), &Device::Cpu).unwrap());
        assert!(windowed[5][2], "same image, outside the window: visible");
        assert!(windowed[2][5], "same image, later position: visible");
        assert!(!windowed[7][3], "text outside the window: hidden");
        assert!(
            windowed[6][5] && !windowed[6][4],
            "window applies after the image"
        );

        // No spans: plain causal.
        let plain = visible(
            &MaskCache::default()
                .get(4, 0, 0, 4, None, &Device::Cpu)
                .unwrap(),
        );
        assert!(!plain[0][1] && plain[1][0]);
    }
}
