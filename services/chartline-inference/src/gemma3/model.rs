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

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Result, Storage, Tensor};

use super::config::Gemma3Config;
use super::kernels::{self, Q8Input, Q8Matrix, U4Matrix};
use super::kv_cache::KvCache;

/// cos/sin tables (max_positions, head_dim / 2) for one RoPE base and scale.
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
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
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
        })
    }

    /// Rotates `x` of shape (1, L, heads, head_dim) for positions `pos .. pos + L`.
    fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let l = x.dim(1)?;
        let cos = self.cos.narrow(0, pos, l)?;
        let sin = self.sin.narrow(0, pos, l)?;
        candle_nn::rotary_emb::rope_thd(&x.contiguous()?, &cos, &sin)
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
    /// Q4_K repacked for Chartline's kernels.
    U4(Arc<U4Matrix>),
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
            Weight::U4(m) => {
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
        Ok(Gemma3 {
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

/// Attention of one new token (L = 1) on the CPU with Chartline's f32 kernels: every cached
/// key is visible to it (the caller drops keys outside the window), so no mask. Each key
/// and value row is read once for the query heads of its group, and ranges of keys are
/// spread over candle's worker pool (partial sums added in a fixed order). `None` when the
/// tensors are not plain CPU f32 with contiguous rows (candle's path then runs).
fn attend_one(q: &Tensor, keys: &Tensor, values: &Tensor, g: usize) -> Result<Option<Tensor>> {
    use std::sync::{Mutex, PoisonError};
    let (_, nh, l, hd) = q.dims4()?;
    let (_, nkv, t, vd) = values.dims4()?;
    if l != 1
        || !q.device().is_cpu()
        || q.dtype() != DType::F32
        || t == 0
        || g == 0
        || g > kernels::MAX_HEADS
        || nh != nkv * g
    {
        return Ok(None);
    }
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let (key_storage, kl) = keys.storage_and_layout();
    let (value_storage, vl) = values.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*key_storage, &*value_storage) else {
        return Ok(None);
    };
    let (Ok(kdata), Ok(vdata)) = (kc.as_slice::<f32>(), vc.as_slice::<f32>()) else {
        return Ok(None);
    };
    let (ks, vs) = (kl.stride(), vl.stride());
    if ks.len() != 4 || vs.len() != 4 || ks[3] != 1 || vs[3] != 1 {
        return Ok(None);
    }
    let pool = candle_core::utils::barrier_pool();
    let items = t.div_ceil(KEYS_PER_ITEM);
    let mut out = vec![0f32; nh * vd];
    for (kv, out) in out.chunks_exact_mut(g * vd).enumerate() {
        let qg = &q[kv * g * hd..(kv + 1) * g * hd];
        let (kbase, vbase) = (
            kl.start_offset() + kv * ks[1],
            vl.start_offset() + kv * vs[1],
        );
        // Scores, [key][head].
        let mut scores = vec![0f32; t * g];
        let pieces: Vec<Mutex<&mut [f32]>> = scores
            .chunks_mut(KEYS_PER_ITEM * g)
            .map(Mutex::new)
            .collect();
        let failed = Mutex::new(None);
        pool.execute_chunked(items, |range| {
            for c in range {
                let mut piece = pieces[c].lock().unwrap_or_else(PoisonError::into_inner);
                for (i, s) in piece.chunks_exact_mut(g).enumerate() {
                    match cached_row(kdata, kbase, ks[2], c * KEYS_PER_ITEM + i, hd) {
                        Ok(k) => kernels::dots(qg, k, s),
                        Err(e) => *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e),
                    }
                }
            }
        });
        drop(pieces);
        if let Some(e) = failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
            return Err(e);
        }
        // Softmax per head as candle's `softmax_last_dim`: shift by the max, exponentiate,
        // normalise.
        for h in 0..g {
            let max = scores
                .iter()
                .skip(h)
                .step_by(g)
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut().skip(h).step_by(g) {
                *s = (*s - max).exp();
                sum += *s;
            }
            for s in scores.iter_mut().skip(h).step_by(g) {
                *s /= sum;
            }
        }
        // Weighted values: each item sums its keys' rows into its own partial output.
        let parts: Vec<Mutex<Vec<f32>>> =
            (0..items).map(|_| Mutex::new(vec![0f32; g * vd])).collect();
        let failed = Mutex::new(None);
        pool.execute_chunked(items, |range| {
            for c in range {
                let mut acc = parts[c].lock().unwrap_or_else(PoisonError::into_inner);
                for j in c * KEYS_PER_ITEM..((c + 1) * KEYS_PER_ITEM).min(t) {
                    match cached_row(vdata, vbase, vs[2], j, vd) {
                        Ok(v) => kernels::axpys(&mut acc, &scores[j * g..(j + 1) * g], v),
                        Err(e) => *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e),
                    }
                }
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
            return Err(e);
        }
        for part in parts {
            let part = part.into_inner().unwrap_or_else(PoisonError::into_inner);
            for (o, p) in out.iter_mut().zip(&part) {
                *o += p;
            }
        }
    }
    Ok(Some(Tensor::from_vec(out, (1, 1, nh * vd), &Device::Cpu)?))
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
