//! Chartline's own CPU kernels (x86-64 with AVX2, FMA and F16C, detected at run time, and
//! AVX-512 VNNI variants where the CPU has it): Q8_0, Q5_0 and Q4_K weight matrices, and the
//! f32 dot products of one-token attention.
//!
//! In the Gemma 3 270M Q4_K_M file, Q8_0 holds the tied 262k × 640 embedding (the output
//! projection, 178 MB: most of what one decoded token reads), Q5_0 the query, key, gate and
//! up projections, Q4_K the attention outputs and half the down projections (Q6_K, left to
//! candle, the other half). candle multiplies Q8_0 one activation row at a time against
//! four weight rows (its repacked x86 tiles cover Q4_K and Q6_K, and Q8_0 only with
//! AVX-512/VNNI) and has no SIMD path for Q5_0. These kernels:
//!
//! - **repack** the weights once at load: rows are interleaved in groups of four, block by
//!   block (`[group][block][row]`), 32 quantized values aligned to 32 bytes, with the f16
//!   scales of the four rows side by side (the same 34 bytes per 32 weights as the file);
//! - **quantize** each activation row once per matrix (or once for several matrices that
//!   read the same input, see [`Q8Input`]) to Q8_0 the way llama.cpp's AVX2 path does
//!   (per 32 values: `d = max|x| / 127` rounded to f16, `q = round_half_even(x · 127 / max|x|)`);
//! - **multiply** a tile of 4 weight rows × up to 3 activation rows per step, so each weight
//!   block loaded serves three tokens in prefill and each activation block four rows: per
//!   pair of 32-value blocks, `maddubs(|w|, sign(x, w))` → `madd` → `cvt` → `fma` with the
//!   product of the two scales, exactly the integer dot products llama.cpp computes;
//! - spread row groups over candle's own worker pool (`candle_core::utils::barrier_pool`),
//!   so they share its threads instead of adding a second pool that would spin against it;
//!   one-row products of several matrices that read the same input go out in one dispatch
//!   ([`matvecs`]).
//!
//! Where the CPU has AVX-512 VNNI (with 256-bit forms), the same tiles use `vpdpbusd`
//! (unsigned × signed bytes, summed in 32-bit lanes) instead of `maddubs` + `madd` and the
//! sign tricks: a Q8_0 weight `w` is read as `w ^ 0x80 = w + 128` and the dot product is
//! seeded with `−128 · Σx` per lane (kept with the quantized input), a Q5_0 value as its
//! unsigned 5 bits seeded with `−16 · Σx`, Q4_K values as they are. The integer sums are
//! exactly the AVX2 ones, so every result is bit for bit the same (tested).
//!
//! With 512-bit VNNI, matrices that prefill multiplies also get a third form, [`Wide`]:
//! tiles of 16 rows with 4 values of each row side by side, the layout of candle's own
//! K-quant tiles, so one 512-bit byte dot product with 4 activation values repeated in
//! every lane serves 16 rows, a block's integer sums need no horizontal reduction, and its
//! scale is applied once per 16 rows (against once per row in the 4-row tiles): prefill
//! about a third faster here. Activations stay Q8_0 (a scale per 32), as llama.cpp pairs
//! them with Q8_0 and Q5_0 weights.
//!
//! [`U4Matrix`] holds Q4_K as 4-bit values with an f32 scale and offset per 32 and
//! multiplies them with `maddubs(q, x)` directly (the values are unsigned) over activations
//! quantized as llama.cpp's Q8_K, which is what llama.cpp pairs with K-quants.
//!
//! [`dots`] and [`axpys`] are the f32 loops of attention for one new token (scores against
//! every cached key, then the weighted sum of values), each key and value row read once for
//! all the query heads that share it, where candle's general matmul costs more in set-up
//! than in arithmetic.
//!
//! The repacked matrix also serves embedding lookups (rows dequantized exactly as candle
//! does: `q as f32 * f32(d)`), so the tied embedding is held once.
//!
//! This is the workspace's one module allowed `unsafe`: SIMD intrinsics over raw pointers
//! and one output buffer written by several workers. Every `unsafe` block states why it is
//! sound; the tests compare the kernels with a plain-Rust reference and with candle.
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Values per block.
pub(crate) const QK: usize = 32;
/// Weight rows interleaved per group.
const ROWS: usize = 4;
/// Activation rows per tile in prefill.
const TILE_M: usize = 3;
/// Bytes of one Q8_0 block in a GGUF file: f16 scale, 32 × i8.
const FILE_BLOCK_BYTES: usize = 34;

#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Block([i8; QK]);

const ZERO_BLOCK: Block = Block([0; QK]);

/// Whether this CPU runs the kernels (checked once).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A Q8_0 weight matrix (n output rows × k inputs), repacked for the kernels.
pub(crate) struct Q8Matrix {
    n: usize,
    k: usize,
    nb: usize,
    /// f16 scales, `[group][block][row of 4]`.
    scales: Vec<u16>,
    /// Quantized values, `[group][block][row of 4]`.
    qs: Vec<Block>,
    /// For a matrix stored as Q5_0: the same values in their 5-bit form, which one-token
    /// products read instead (22 bytes per 32 weights instead of 34: decoding is bound by
    /// memory bandwidth, prefill by arithmetic).
    q5: Option<Q5Rows>,
    /// The same values in 16-row tiles for products of several rows on CPUs with 512-bit
    /// VNNI (see [`Wide`]); built on request ([`Q8Matrix::with_wide`]).
    wide: Option<Wide>,
}

/// A Q8_0 matrix in tiles of 16 rows (prefill on CPUs with AVX-512 VNNI): per tile and
/// block, the 16 rows' scales as f32 and their 32 values as `w + 128`, 4 values of each
/// row side by side (`[chunk of 4][row][4]`), so that one 512-bit byte dot product with 4
/// activation values repeated in every lane adds those 4 values' products to all 16 rows;
/// 8 of them make the block's exact integer sums, seeded with `−128 · Σx`.
struct Wide {
    scales: Vec<[f32; WIDE]>,
    qs: Vec<WideBlock>,
}

/// Rows per [`Wide`] tile.
const WIDE: usize = 16;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct WideBlock([u8; QK * WIDE]);

/// Q5_0 blocks, `[group][block][row of 4]`: f16 scale, 32 high bits, 16 bytes of nibbles
/// (value `i` of a block is `(nibble_i | bit_i << 4) - 16`, nibble `i` the low half of byte
/// `i` for `i < 16` and the high half of byte `i - 16` after).
struct Q5Rows {
    scales: Vec<u16>,
    qh: Vec<u32>,
    qs: Vec<[u8; 16]>,
}

/// Bytes of one Q5_0 block in a GGUF file: f16 scale, 4 bytes of high bits, 16 of nibbles.
const Q5_FILE_BLOCK_BYTES: usize = 22;

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix({} x {})", self.n, self.k)
    }
}

impl Q8Matrix {
    /// Repacks a (n, k) Q8_0 tensor; `None` when the kernels cannot take it (another type,
    /// n not a multiple of 4, k not a multiple of 32, or a CPU without AVX2/FMA/F16C).
    pub(crate) fn from_qtensor(t: &QTensor) -> candle_core::Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q8_0 || !available() {
            return Ok(None);
        }
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if !n.is_multiple_of(ROWS) || !k.is_multiple_of(QK) || k == 0 {
            return Ok(None);
        }
        let data = t.data()?;
        Self::from_blocks(&data, n, k).map(Some)
    }

    /// Repacks raw Q8_0 blocks (row-major, 34 bytes each).
    fn from_blocks(data: &[u8], n: usize, k: usize) -> candle_core::Result<Self> {
        let nb = k / QK;
        if data.len() != n * nb * FILE_BLOCK_BYTES {
            candle_core::bail!(
                "Q8_0 data of {} bytes does not hold {n} x {k} values",
                data.len()
            );
        }
        let mut scales = vec![0u16; n * nb];
        let mut qs = vec![ZERO_BLOCK; n * nb];
        for row in 0..n {
            let (g, r) = (row / ROWS, row % ROWS);
            for b in 0..nb {
                let src = &data[(row * nb + b) * FILE_BLOCK_BYTES..][..FILE_BLOCK_BYTES];
                let at = (g * nb + b) * ROWS + r;
                scales[at] = u16::from_le_bytes([src[0], src[1]]);
                for (q, &byte) in qs[at].0.iter_mut().zip(&src[2..]) {
                    *q = byte as i8;
                }
            }
        }
        Ok(Q8Matrix {
            n,
            k,
            nb,
            scales,
            qs,
            q5: None,
            wide: None,
        })
    }

    /// Packs a (n, k) matrix of raw Q5_0 blocks (row-major, 22 bytes each) in both forms:
    /// 5-bit for one-token products, and widened to Q8_0 (the same values) for prefill.
    /// `None` when the kernels cannot take it.
    pub(crate) fn from_q5_0(data: &[u8], n: usize, k: usize) -> candle_core::Result<Option<Self>> {
        if !available() || !n.is_multiple_of(ROWS) || !k.is_multiple_of(QK) || k == 0 {
            return Ok(None);
        }
        let nb = k / QK;
        if data.len() != n * nb * Q5_FILE_BLOCK_BYTES {
            candle_core::bail!(
                "Q5_0 data of {} bytes does not hold {n} x {k} values",
                data.len()
            );
        }
        let mut scales = vec![0u16; n * nb];
        let mut qh = vec![0u32; n * nb];
        let mut q5s = vec![[0u8; 16]; n * nb];
        let mut qs = vec![ZERO_BLOCK; n * nb];
        for row in 0..n {
            let (g, r) = (row / ROWS, row % ROWS);
            for b in 0..nb {
                let src = &data[(row * nb + b) * Q5_FILE_BLOCK_BYTES..][..Q5_FILE_BLOCK_BYTES];
                let at = (g * nb + b) * ROWS + r;
                scales[at] = u16::from_le_bytes([src[0], src[1]]);
                let bits = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
                qh[at] = bits;
                q5s[at].copy_from_slice(&src[6..]);
                for (j, &byte) in src[6..].iter().enumerate() {
                    let lo = (byte & 0x0F) | ((((bits >> j) & 1) as u8) << 4);
                    let hi = (byte >> 4) | ((((bits >> (j + 16)) & 1) as u8) << 4);
                    qs[at].0[j] = lo as i8 - 16;
                    qs[at].0[j + 16] = hi as i8 - 16;
                }
            }
        }
        let q5 = Some(Q5Rows {
            scales: scales.clone(),
            qh,
            qs: q5s,
        });
        Ok(Some(Q8Matrix {
            n,
            k,
            nb,
            scales,
            qs,
            q5,
            wide: None,
        }))
    }

    /// Adds the 16-row tiles for products of several rows (prefill) where the CPU has
    /// 512-bit VNNI and the height is a multiple of 16: about as much memory again as the
    /// matrix, so only for matrices that prefill multiplies. A Q5_0 matrix then drops its
    /// 4-row Q8_0 form (one-row products read the 5-bit one).
    pub(crate) fn with_wide(mut self) -> Self {
        if !wide_k_quants() || !self.n.is_multiple_of(WIDE) {
            return self;
        }
        let (n, nb) = (self.n, self.nb);
        let mut scales = vec![[0f32; WIDE]; n / WIDE * nb];
        let mut qs = vec![WideBlock([0; QK * WIDE]); n / WIDE * nb];
        for row in 0..n {
            let (tile, lane) = (row / WIDE, row % WIDE);
            for b in 0..nb {
                let at = ((row / ROWS) * nb + b) * ROWS + row % ROWS;
                scales[tile * nb + b][lane] = f16::from_bits(self.scales[at]).to_f32();
                for (i, &v) in self.qs[at].0.iter().enumerate() {
                    qs[tile * nb + b].0[(i / 4) * WIDE * 4 + lane * 4 + i % 4] = v as u8 ^ 0x80;
                }
            }
        }
        self.wide = Some(Wide { scales, qs });
        if self.q5.is_some() {
            // One-row products read the 5-bit form and several rows the 16-row tiles: the
            // 4-row Q8_0 form would only take memory.
            self.scales = Vec::new();
            self.qs = Vec::new();
        }
        self
    }

    /// Weight `(row, block b)`'s scale and its value `i`, from whichever Q8_0 form the
    /// matrix holds (the 4-row one, or only the 16-row tiles).
    fn weight(&self, row: usize, b: usize, i: usize) -> (f32, i8) {
        match &self.wide {
            Some(w) if self.qs.is_empty() => {
                let at = (row / WIDE) * self.nb + b;
                let lane = row % WIDE;
                let v = w.qs[at].0[(i / 4) * WIDE * 4 + lane * 4 + i % 4] ^ 0x80;
                (w.scales[at][lane], v as i8)
            }
            _ => {
                let at = ((row / ROWS) * self.nb + b) * ROWS + row % ROWS;
                (f16::from_bits(self.scales[at]).to_f32(), self.qs[at].0[i])
            }
        }
    }

    /// (rows, inputs).
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Row `i` dequantized into `out` (k values), as candle dequantizes Q8_0.
    pub(crate) fn row_into(&self, i: usize, out: &mut [f32]) {
        for (b, chunk) in out.chunks_exact_mut(QK).enumerate().take(self.nb) {
            for (v, o) in chunk.iter_mut().enumerate() {
                let (d, q) = self.weight(i, b, v);
                *o = f32::from(q) * d;
            }
        }
    }

    /// Rows `ids` dequantized, `ids.len() × k` values (an embedding lookup).
    pub(crate) fn rows(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.k];
        for (&id, chunk) in ids.iter().zip(out.chunks_exact_mut(self.k)) {
            let id = id as usize;
            if id >= self.n {
                candle_core::bail!("token id {id} is outside the {} rows", self.n);
            }
            self.row_into(id, chunk);
        }
        Ok(out)
    }

    /// `out (m × n) = x (m × k) · selfᵀ` for an input quantized by [`Q8Input::quantize`].
    pub(crate) fn matmul(&self, x: &Q8Input, out: &mut [f32]) -> candle_core::Result<()> {
        if x.k != self.k || out.len() != x.m * self.n {
            candle_core::bail!(
                "Q8_0 matmul of ({}, {}) by ({}, {})ᵀ into {} values",
                x.m,
                x.k,
                self.n,
                self.k,
                out.len()
            );
        }
        if x.m == 1 {
            return matvecs(Some(x), None, &mut [(Packed::Q8(self), out)]);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(wide) = &self.wide {
            let (n, nb) = (self.n, self.nb);
            // SAFETY: `with_wide` built the tiles only where 512-bit VNNI was detected; each
            // tile's nb blocks are inside the arrays, input rows 0 .. m exist, and columns
            // 16·tile .. 16·tile + 16 of every output row are that tile's alone.
            unsafe {
                par_tiles::<4, _>(n / WIDE, x.m, out, |tile, out| WideTile {
                    wide,
                    n,
                    nb,
                    tile,
                    x,
                    out,
                });
            }
            return Ok(());
        }
        if self.qs.is_empty() {
            candle_core::bail!("a matrix held only as 16-row tiles needs a CPU with VNNI");
        }
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the kernels were detected; every slice index is inside the matrices
            // (g < n / 4, blocks < nb, rows < m), and each (row, column) of `out` is written
            // by exactly one group.
            unsafe {
                par_tiles::<TILE_M, _>(self.n / ROWS, x.m, out, |g, out| Q8Group {
                    m: self,
                    g,
                    x,
                    out,
                });
            }
            return Ok(());
        }
        self.matmul_reference(x, out);
        Ok(())
    }

    /// Group `g` (4 weight rows) against the one row of `x`: the 5-bit form when the matrix
    /// has one, else Q8_0.
    ///
    /// # Safety
    /// The kernels must be available, `g < n / 4`, `x` one row of width `k`, and `out` must
    /// hold `n` values of which this call alone writes `4g .. 4g + 4`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn group_one(&self, g: usize, x: Option<&Q8Input>, out: *mut f32) {
        let Some(x) = x else { return };
        let at = g * self.nb * ROWS;
        let sums = match &self.q5 {
            Some(q5) => unsafe {
                tile_q5(
                    q5.scales[at..].as_ptr(),
                    q5.qh[at..].as_ptr(),
                    q5.qs[at..].as_ptr(),
                    self.nb,
                    x.scales_at(0),
                    x.blocks_at(0),
                    x.bias_at(0),
                )
            },
            None => unsafe {
                tile::<1>(
                    self.scales[at..].as_ptr(),
                    self.qs[at..].as_ptr(),
                    self.nb,
                    x.scales_at(0),
                    x.blocks_at(0),
                    x.bias_at(0),
                )[0]
            },
        };
        unsafe { store(out, self.n, 0, g * ROWS, &[sums]) };
    }

    /// The same products in plain Rust (CPUs without the kernels, and the tests' reference).
    fn matmul_reference(&self, x: &Q8Input, out: &mut [f32]) {
        for t in 0..x.m {
            for row in 0..self.n {
                let mut sum = 0f32;
                for b in 0..self.nb {
                    let xb = &x.qs[t * x.nb + b].0;
                    let d = self.weight(row, b, 0).0;
                    let dot: i32 = xb
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| i32::from(self.weight(row, b, i).1) * i32::from(v))
                        .sum();
                    sum += dot as f32 * (d * x.scales[t * x.nb + b]);
                }
                out[t * self.n + row] = sum;
            }
        }
    }
}

/// Bytes of one Q4_K super-block in a GGUF file: f16 d, f16 dmin, 12 bytes of 6-bit scales
/// and mins, 128 bytes of nibbles, for 256 values.
const Q4K_FILE_BLOCK_BYTES: usize = 144;
/// Values per Q4_K super-block.
const QK_K: usize = 256;

/// A 4-bit matrix with a scale and an offset per 32 values (n rows × k inputs), built from
/// Q4_K: value = `a · q − b`, `q` in 0..16, `a = d · scale`, `b = dmin · min` (both exact in
/// f32), as candle and llama.cpp dequantize Q4_K. Products take activations quantized as
/// Q8_K ([`Q8Input::quantize_k`]), block by block of 32:
/// `Σ (a·q − b)·dx·x = a·dx·Σ q·x − b·dx·Σ x`, with `maddubs(q, x)` directly (q is unsigned).
pub(crate) struct U4Matrix {
    n: usize,
    k: usize,
    nb: usize,
    /// `a`, `[group][block][row of 4]`.
    scales: Vec<f32>,
    /// `b`, `[group][block][row of 4]`.
    offsets: Vec<f32>,
    /// Values `i < 16` in the low nibble of byte `i`, `i >= 16` in the high nibble of byte
    /// `i - 16`; `[group][block][row of 4]`.
    qs: Vec<[u8; 16]>,
}

impl std::fmt::Debug for U4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "U4Matrix({} x {})", self.n, self.k)
    }
}

/// Scale and min of sub-block `j` (0..8) from Q4_K's 12 packed bytes (llama.cpp's
/// `get_scale_min_k4`).
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

impl U4Matrix {
    /// Repacks a (n, k) Q4_K tensor; `None` when the kernels cannot take it.
    pub(crate) fn from_qtensor(t: &QTensor) -> candle_core::Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q4K || !available() {
            return Ok(None);
        }
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if !n.is_multiple_of(ROWS) || !k.is_multiple_of(QK_K) || k == 0 {
            return Ok(None);
        }
        Self::from_q4k(&t.data()?, n, k).map(Some)
    }

    fn from_q4k(data: &[u8], n: usize, k: usize) -> candle_core::Result<Self> {
        let nb = k / QK;
        let supers = k / QK_K;
        if data.len() != n * supers * Q4K_FILE_BLOCK_BYTES {
            candle_core::bail!(
                "Q4_K data of {} bytes does not hold {n} x {k} values",
                data.len()
            );
        }
        let mut scales = vec![0f32; n * nb];
        let mut offsets = vec![0f32; n * nb];
        let mut qs = vec![[0u8; 16]; n * nb];
        for row in 0..n {
            let (g, r) = (row / ROWS, row % ROWS);
            for sb in 0..supers {
                let src =
                    &data[(row * supers + sb) * Q4K_FILE_BLOCK_BYTES..][..Q4K_FILE_BLOCK_BYTES];
                let d = f16::from_le_bytes([src[0], src[1]]).to_f32();
                let dmin = f16::from_le_bytes([src[2], src[3]]).to_f32();
                let (packed, nibbles) = (&src[4..16], &src[16..]);
                for j in 0..8 {
                    let (sc, m) = q4k_scale_min(j, packed);
                    // Sub-blocks 2p and 2p + 1 are the low and high nibbles of bytes
                    // 32p .. 32p + 32.
                    let bytes = &nibbles[32 * (j / 2)..32 * (j / 2) + 32];
                    let value = |i: usize| {
                        if j % 2 == 0 {
                            bytes[i] & 0x0F
                        } else {
                            bytes[i] >> 4
                        }
                    };
                    let at = (g * nb + sb * 8 + j) * ROWS + r;
                    scales[at] = d * f32::from(sc);
                    offsets[at] = dmin * f32::from(m);
                    for (i, q) in qs[at].iter_mut().enumerate() {
                        *q = value(i) | (value(i + 16) << 4);
                    }
                }
            }
        }
        Ok(U4Matrix {
            n,
            k,
            nb,
            scales,
            offsets,
            qs,
        })
    }

    /// (rows, inputs).
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Row `i` dequantized (`a·q − b`, as candle dequantizes Q4_K).
    #[cfg(test)]
    fn row(&self, i: usize) -> Vec<f32> {
        let (g, r) = (i / ROWS, i % ROWS);
        let mut out = Vec::with_capacity(self.k);
        for b in 0..self.nb {
            let at = (g * self.nb + b) * ROWS + r;
            let q = |v: usize| {
                if v < 16 {
                    self.qs[at][v] & 0x0F
                } else {
                    self.qs[at][v - 16] >> 4
                }
            };
            out.extend((0..QK).map(|v| self.scales[at] * f32::from(q(v)) - self.offsets[at]));
        }
        out
    }

    /// `out (m × n) = x (m × k) · selfᵀ`.
    pub(crate) fn matmul(&self, x: &Q8Input, out: &mut [f32]) -> candle_core::Result<()> {
        if x.k != self.k || out.len() != x.m * self.n {
            candle_core::bail!(
                "4-bit matmul of ({}, {}) by ({}, {})ᵀ into {} values",
                x.m,
                x.k,
                self.n,
                self.k,
                out.len()
            );
        }
        if x.m == 1 {
            return matvecs(None, Some(x), &mut [(Packed::U4(self), out)]);
        }
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the kernels were detected; each group's `nb * 4` blocks are inside the
            // packed arrays, input rows 0 .. m exist, and columns `4g .. 4g + 4` of every
            // output row are that group's alone.
            unsafe {
                par_tiles::<TILE_M, _>(self.n / ROWS, x.m, out, |g, out| U4Group {
                    m: self,
                    g,
                    x,
                    out,
                });
            }
            return Ok(());
        }
        self.matmul_reference(x, out);
        Ok(())
    }

    /// Group `g` (4 weight rows) against the one row of `x` (Q8_K).
    ///
    /// # Safety
    /// As [`Q8Matrix::group_one`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn group_one(&self, g: usize, x: Option<&Q8Input>, out: *mut f32) {
        let Some(x) = x else { return };
        let at = g * self.nb * ROWS;
        let w = (
            self.scales[at..].as_ptr(),
            self.offsets[at..].as_ptr(),
            self.qs[at..].as_ptr(),
        );
        let sums =
            unsafe { tile_u4::<1>(w, self.nb, x.scales_at(0), x.sums_at(0), x.blocks_at(0)) };
        unsafe { store(out, self.n, 0, g * ROWS, &sums) };
    }

    /// The same products in plain Rust.
    fn matmul_reference(&self, x: &Q8Input, out: &mut [f32]) {
        for t in 0..x.m {
            for row in 0..self.n {
                let (g, r) = (row / ROWS, row % ROWS);
                let mut sum = 0f32;
                let mut off = 0f32;
                for b in 0..self.nb {
                    let at = (g * self.nb + b) * ROWS + r;
                    let xb = &x.qs[t * x.nb + b].0;
                    let q = |v: usize| {
                        if v < 16 {
                            self.qs[at][v] & 0x0F
                        } else {
                            self.qs[at][v - 16] >> 4
                        }
                    };
                    let dot: i32 = (0..QK).map(|v| i32::from(q(v)) * i32::from(xb[v])).sum();
                    let dx = x.scales[t * x.nb + b];
                    sum += dot as f32 * (self.scales[at] * dx);
                    off += self.offsets[at] * (dx * x.sums[t * x.nb + b]);
                }
                out[t * self.n + row] = sum - off;
            }
        }
    }
}

/// A repacked matrix of either kind, for [`matvecs`].
#[derive(Clone, Copy)]
pub(crate) enum Packed<'a> {
    /// Q8_0 (or Q5_0 held in both forms), multiplied with a Q8_0 input.
    Q8(&'a Q8Matrix),
    /// Q4_K, multiplied with a Q8_K input.
    U4(&'a U4Matrix),
}

impl Packed<'_> {
    /// (rows, inputs).
    pub(crate) fn dims(&self) -> (usize, usize) {
        match self {
            Packed::Q8(m) => m.dims(),
            Packed::U4(m) => m.dims(),
        }
    }
}

/// One-row products `out_j = x · m_jᵀ` for several matrices that read the same input
/// (query/key/value, gate/up) in one pass over the worker pool: one dispatch instead of one
/// per matrix, each worker taking 4-row groups of whichever matrix comes next. Q8 matrices
/// read `x8` (the input as Q8_0), Q4_K matrices `xk` (as Q8_K); each holds one row. The sums
/// are those of [`Q8Matrix::matmul`] and [`U4Matrix::matmul`] for one row.
pub(crate) fn matvecs(
    x8: Option<&Q8Input>,
    xk: Option<&Q8Input>,
    jobs: &mut [(Packed<'_>, &mut [f32])],
) -> candle_core::Result<()> {
    for (m, out) in jobs.iter() {
        let (n, k) = m.dims();
        let (x, kind) = match m {
            Packed::Q8(_) => (x8, "Q8_0"),
            Packed::U4(_) => (xk, "Q8_K"),
        };
        let Some(x) = x else {
            candle_core::bail!("a ({n}, {k}) matrix needs its input as {kind}");
        };
        if x.m != 1 || x.k != k || out.len() != n {
            candle_core::bail!(
                "one-row product of ({}, {}) by ({n}, {k})ᵀ into {} values",
                x.m,
                x.k,
                out.len()
            );
        }
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        // Group index where each job starts, and each job's output.
        let mut starts = Vec::with_capacity(jobs.len() + 1);
        let mut total = 0;
        for (m, _) in jobs.iter() {
            starts.push(total);
            total += m.dims().0 / ROWS;
        }
        starts.push(total);
        let outs: Vec<SharedOut> = jobs
            .iter_mut()
            .map(|(_, out)| SharedOut(out.as_mut_ptr()))
            .collect();
        let ms: Vec<Packed<'_>> = jobs.iter().map(|(m, _)| *m).collect();
        candle_core::utils::barrier_pool().execute_chunked(total, |groups| {
            let (outs, starts) = (&outs, &starts);
            for g in groups {
                let j = starts.partition_point(|&s| s <= g) - 1;
                let local = g - starts[j];
                // SAFETY: the kernels were detected; `local` is a group of job `j`'s matrix
                // (below its n / 4 groups), its input was checked above to hold one row of
                // the matrix's width, and columns `4·local .. 4·local + 4` of that job's
                // output are written by this group alone.
                unsafe {
                    match ms[j] {
                        Packed::Q8(m) => m.group_one(local, x8, outs[j].0),
                        Packed::U4(m) => m.group_one(local, xk, outs[j].0),
                    }
                }
            }
        });
        return Ok(());
    }
    for (m, out) in jobs.iter_mut() {
        match m {
            Packed::Q8(m) => {
                if let Some(x) = x8 {
                    m.matmul_reference(x, out);
                }
            }
            Packed::U4(m) => {
                if let Some(x) = xk {
                    m.matmul_reference(x, out);
                }
            }
        }
    }
    Ok(())
}

/// One weight tile (4 or 16 rows) against `R` input rows starting at row `t`, writing its
/// own columns of those output rows.
#[cfg(target_arch = "x86_64")]
trait RowTile {
    /// # Safety
    /// The tile's kernel must be available and input rows `t .. t + R` must exist.
    unsafe fn rows<const R: usize>(&self, t: usize);
}

/// Runs `tile` over input rows `0 .. m`, `STEP` (at most 4) at a time, then the tail.
///
/// # Safety
/// As [`RowTile::rows`] for every row of `0 .. m`.
#[cfg(target_arch = "x86_64")]
unsafe fn over_rows<const STEP: usize, T: RowTile>(tile: &T, m: usize) {
    let mut t = 0;
    while t + STEP <= m {
        unsafe { tile.rows::<STEP>(t) };
        t += STEP;
    }
    unsafe {
        match m - t {
            3 => tile.rows::<3>(t),
            2 => tile.rows::<2>(t),
            1 => tile.rows::<1>(t),
            _ => {}
        }
    }
}

/// The tiles `make(i, out)` for `i < count`, spread over candle's worker pool, each over
/// input rows `0 .. m` (see [`over_rows`]).
///
/// # Safety
/// Every tile must be valid for rows `0 .. m` and write only its own columns of `out`.
#[cfg(target_arch = "x86_64")]
unsafe fn par_tiles<const STEP: usize, T: RowTile>(
    count: usize,
    m: usize,
    out: &mut [f32],
    make: impl Fn(usize, *mut f32) -> T + Sync,
) {
    let out_ptr = SharedOut(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(count, |tiles| {
        let out_ptr = &out_ptr;
        for i in tiles {
            // SAFETY: the caller's.
            unsafe { over_rows::<STEP, _>(&make(i, out_ptr.0), m) };
        }
    });
}

/// A 4-row group of a [`Q8Matrix`] (4-row layout) over a Q8_0 input.
#[cfg(target_arch = "x86_64")]
struct Q8Group<'a> {
    m: &'a Q8Matrix,
    g: usize,
    x: &'a Q8Input,
    out: *mut f32,
}

#[cfg(target_arch = "x86_64")]
impl RowTile for Q8Group<'_> {
    unsafe fn rows<const R: usize>(&self, t: usize) {
        let (m, x) = (self.m, self.x);
        let at = self.g * m.nb * ROWS;
        let (ws, wq) = (m.scales[at..].as_ptr(), m.qs[at..].as_ptr());
        unsafe {
            let sums = tile::<R>(ws, wq, m.nb, x.scales_at(t), x.blocks_at(t), x.bias_at(t));
            store(self.out, m.n, t, self.g * ROWS, &sums);
        }
    }
}

/// A 4-row group of a [`U4Matrix`] over a Q8_K input.
#[cfg(target_arch = "x86_64")]
struct U4Group<'a> {
    m: &'a U4Matrix,
    g: usize,
    x: &'a Q8Input,
    out: *mut f32,
}

#[cfg(target_arch = "x86_64")]
impl RowTile for U4Group<'_> {
    unsafe fn rows<const R: usize>(&self, t: usize) {
        let (m, x) = (self.m, self.x);
        let at = self.g * m.nb * ROWS;
        let w = (
            m.scales[at..].as_ptr(),
            m.offsets[at..].as_ptr(),
            m.qs[at..].as_ptr(),
        );
        unsafe {
            let sums = tile_u4::<R>(w, m.nb, x.scales_at(t), x.sums_at(t), x.blocks_at(t));
            store(self.out, m.n, t, self.g * ROWS, &sums);
        }
    }
}

/// A 16-row tile of a [`Wide`] form over a Q8_0 input.
#[cfg(target_arch = "x86_64")]
struct WideTile<'a> {
    wide: &'a Wide,
    n: usize,
    nb: usize,
    tile: usize,
    x: &'a Q8Input,
    out: *mut f32,
}

#[cfg(target_arch = "x86_64")]
impl RowTile for WideTile<'_> {
    unsafe fn rows<const R: usize>(&self, t: usize) {
        let (nb, tile) = (self.nb, self.tile);
        let w = (
            self.wide.scales[tile * nb..].as_ptr(),
            self.wide.qs[tile * nb..].as_ptr(),
        );
        unsafe {
            let out = self.out.add(t * self.n + tile * WIDE);
            wide::tile::<R>(w, nb, self.x, t, out, self.n);
        }
    }
}

/// Writes a tile's sums: `sums[j][r]` is output row `t + j`, column `col + r`.
///
/// # Safety
/// `out` must hold `(t + R) × n` values and `col + 4 <= n`.
#[cfg(target_arch = "x86_64")]
unsafe fn store<const R: usize>(
    out: *mut f32,
    n: usize,
    t: usize,
    col: usize,
    sums: &[[f32; ROWS]; R],
) {
    for (j, row) in sums.iter().enumerate() {
        for (r, &v) in row.iter().enumerate() {
            unsafe { *out.add((t + j) * n + col + r) = v };
        }
    }
}

/// The output pointer, shared by the pool's workers; each writes disjoint elements.
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint elements (one weight-row group each) while the caller
// waits in `execute_chunked`.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

/// Activation rows quantized to Q8_0 (f32 copies of the f16-rounded scales).
pub(crate) struct Q8Input {
    m: usize,
    k: usize,
    nb: usize,
    scales: Vec<f32>,
    qs: Vec<Block>,
    /// Σ of each block's quantized values (for matrices with offsets, see [`U4Matrix`]).
    sums: Vec<f32>,
    /// On CPUs with VNNI: per block, `−128 ×` the sum of each 4 consecutive values, i.e. of
    /// each 32-bit lane of a byte dot product. Seeding the dot product of weights read as
    /// `w + 128` (unsigned) with it gives `Σ w·x` exactly, without sign tricks.
    bias: Vec<[i32; 8]>,
}

impl Q8Input {
    /// Rows of quantized blocks; `biased` computes the lane biases (Q8_0 inputs on a CPU
    /// with VNNI; the Q4_K kernel does not read them).
    fn new(m: usize, k: usize, scales: Vec<f32>, qs: Vec<Block>, biased: bool) -> Self {
        let sums = block_sums(&qs);
        #[cfg(target_arch = "x86_64")]
        let bias = if biased && vnni() {
            qs.iter()
                .map(|b| {
                    let mut lanes = [0i32; 8];
                    for (l, four) in lanes.iter_mut().zip(b.0.chunks_exact(4)) {
                        *l = -128 * four.iter().map(|&v| i32::from(v)).sum::<i32>();
                    }
                    lanes
                })
                .collect()
        } else {
            Vec::new()
        };
        #[cfg(not(target_arch = "x86_64"))]
        let bias = {
            let _ = biased;
            Vec::new()
        };
        Q8Input {
            m,
            k,
            nb: k / QK,
            scales,
            qs,
            sums,
            bias,
        }
    }

    /// Quantizes `x` (m rows of k values; k a multiple of 32).
    pub(crate) fn quantize(x: &[f32], m: usize, k: usize) -> candle_core::Result<Self> {
        if !k.is_multiple_of(QK) || x.len() != m * k {
            candle_core::bail!("cannot quantize {} values as {m} rows of {k}", x.len());
        }
        let nb = k / QK;
        let mut scales = vec![0f32; m * nb];
        let mut qs = vec![ZERO_BLOCK; m * nb];
        #[cfg(target_arch = "x86_64")]
        if available() {
            for ((chunk, s), q) in x.chunks_exact(QK).zip(&mut scales).zip(&mut qs) {
                // SAFETY: the kernels were detected; `chunk` holds 32 values.
                *s = unsafe { avx2::quantize_block(chunk.as_ptr(), &mut q.0) };
            }
            return Ok(Q8Input::new(m, k, scales, qs, true));
        }
        for ((chunk, s), q) in x.chunks_exact(QK).zip(&mut scales).zip(&mut qs) {
            *s = quantize_block_reference(chunk, &mut q.0);
        }
        Ok(Q8Input::new(m, k, scales, qs, true))
    }

    /// Quantizes `x` (m rows of k values; k a multiple of 256) as llama.cpp's Q8_K, the
    /// activations it multiplies K-quant weights with: one scale per 256 values
    /// (`d = -max/127` for the value of largest magnitude `max`), values rounded half to
    /// even and clamped to -128..=127. The scale is repeated for each 32-value block.
    /// [`U4Matrix`] products over this input are llama.cpp's Q4_K products.
    pub(crate) fn quantize_k(x: &[f32], m: usize, k: usize) -> candle_core::Result<Self> {
        if !k.is_multiple_of(QK_K) || x.len() != m * k {
            candle_core::bail!(
                "cannot quantize {} values as {m} rows of {k} (Q8_K)",
                x.len()
            );
        }
        let nb = k / QK;
        let mut scales = vec![0f32; m * nb];
        let mut qs = vec![ZERO_BLOCK; m * nb];
        for ((chunk, s), q) in x
            .chunks_exact(QK_K)
            .zip(scales.chunks_exact_mut(QK_K / QK))
            .zip(qs.chunks_exact_mut(QK_K / QK))
        {
            let (mut max, mut amax) = (0f32, 0f32);
            for &v in chunk {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                continue;
            }
            let iscale = -127.0 / max;
            for (block, values) in q.iter_mut().zip(chunk.chunks_exact(QK)) {
                #[cfg(target_arch = "x86_64")]
                if available() {
                    // SAFETY: the kernels were detected; `values` holds 32 values.
                    unsafe { avx2::scale_block(values.as_ptr(), iscale, &mut block.0) };
                    continue;
                }
                for (q, &v) in block.0.iter_mut().zip(values) {
                    *q = (iscale * v).round_ties_even().clamp(-128.0, 127.0) as i8;
                }
            }
            s.fill(1.0 / iscale);
        }
        Ok(Q8Input::new(m, k, scales, qs, false))
    }

    /// Rows.
    pub(crate) fn rows(&self) -> usize {
        self.m
    }

    fn scales_at(&self, t: usize) -> *const f32 {
        self.scales[t * self.nb..].as_ptr()
    }

    fn blocks_at(&self, t: usize) -> *const Block {
        self.qs[t * self.nb..].as_ptr()
    }

    /// Row `t`'s lane biases (see `bias`); null where there are none (a CPU without VNNI),
    /// which makes the kernels take the AVX2 path.
    fn bias_at(&self, t: usize) -> *const [i32; 8] {
        self.bias
            .get(t * self.nb..)
            .map_or(std::ptr::null(), <[[i32; 8]]>::as_ptr)
    }

    fn sums_at(&self, t: usize) -> *const f32 {
        self.sums[t * self.nb..].as_ptr()
    }
}

/// Σ of each block's values (exact: at most 32 · 127).
fn block_sums(qs: &[Block]) -> Vec<f32> {
    qs.iter()
        .map(|b| b.0.iter().map(|&v| i32::from(v)).sum::<i32>() as f32)
        .collect()
}

/// llama.cpp's Q8_0 quantization of one block with round-half-to-even (its AVX2 path);
/// returns the scale as stored (f16) in f32.
fn quantize_block_reference(x: &[f32], q: &mut [i8; QK]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
    }
    f16::from_f32(d).to_f32()
}

/// Most query heads [`dots`] and [`axpys`] take per call.
pub(crate) const MAX_HEADS: usize = 8;

/// `out[h] = Σ q[h·d + i]·k[i]` for `h < out.len()` (at most [`MAX_HEADS`]), `d = k.len()`:
/// the query heads of one key/value group against one key, read once.
pub(crate) fn dots(q: &[f32], k: &[f32], out: &mut [f32]) {
    let (d, g) = (k.len(), out.len().min(MAX_HEADS));
    assert!(
        q.len() >= g * d,
        "{} query values for {g} heads of {d}",
        q.len()
    );
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the kernels were detected; `q` holds `g·d` values, `k` `d`, `out` `g`.
        unsafe { avx2::dots(q.as_ptr(), k.as_ptr(), d, out.as_mut_ptr(), g) };
        return;
    }
    for (h, o) in out.iter_mut().take(g).enumerate() {
        *o = q[h * d..(h + 1) * d]
            .iter()
            .zip(k)
            .map(|(a, b)| a * b)
            .sum();
    }
}

/// `out[h·d + i] += p[h]·v[i]` for `h < p.len()` (at most [`MAX_HEADS`]), `d = v.len()`:
/// one value row, read once, into the outputs of a group's query heads.
pub(crate) fn axpys(out: &mut [f32], p: &[f32], v: &[f32]) {
    let (d, g) = (v.len(), p.len().min(MAX_HEADS));
    assert!(
        out.len() >= g * d,
        "{} outputs for {g} heads of {d}",
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the kernels were detected; `out` holds `g·d` values, `v` `d`, `p` `g`;
        // `out` is borrowed mutably, so it overlaps neither input.
        unsafe { avx2::axpys(out.as_mut_ptr(), p.as_ptr(), g, v.as_ptr(), d) };
        return;
    }
    for (h, &ph) in p.iter().take(g).enumerate() {
        for (o, x) in out[h * d..(h + 1) * d].iter_mut().zip(v) {
            *o += ph * x;
        }
    }
}

/// `gate[i] = gelu_tanh(gate[i]) · up[i]`, Gemma's feed-forward activation, with GELU's
/// tanh form written as the equal `x / (1 + exp(-2u))`, `u = √(2/π)·(x + 0.044715·x³)`
/// (one exponential, no cancellation near -1). Agrees with candle's `gelu()` (libm `tanhf`)
/// to a few ulp.
pub(crate) fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    let n = gate.len().min(up.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the kernels were detected; both slices hold `n` values.
        unsafe { avx2::gelu_tanh_mul(gate.as_mut_ptr(), up.as_ptr(), n) };
        return;
    }
    for (g, u) in gate[..n].iter_mut().zip(&up[..n]) {
        *g = gelu_tanh(*g) * u;
    }
}

/// `s[i] = exp(s[i] - shift)` in place; returns `Σ s[i]` (the softmax numerators of one
/// head over a range of keys and their sum).
pub(crate) fn exp_shifted_sum(s: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the kernels were detected; `s` holds `s.len()` values.
        return unsafe { avx2::exp_shifted_sum(s.as_mut_ptr(), s.len(), shift) };
    }
    let mut sum = 0f32;
    for v in s.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

/// GELU, tanh form, as candle computes it.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

/// The tile kernels for one instruction set: `$dot!(u, s)` is the per-32-bit-lane sum of
/// four products of unsigned bytes `u` with signed bytes `s`, as i32.
#[cfg(target_arch = "x86_64")]
macro_rules! tiles {
    ($features:literal, $dot:ident, $signed:ident, $signed_dot:ident, $q5_bias:ident, $q5_dot:ident) => {
        /// Dot products of 4 weight rows (scales `ws`, blocks `wq`, `[block][row]`) with `R`
        /// activation rows (scales `xs`, blocks `xq`, `nb` blocks apart): `[row j][weight r]`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn tile<const R: usize>(
            ws: *const u16,
            wq: *const Block,
            nb: usize,
            xs: *const f32,
            xq: *const Block,
            xl: *const [i32; 8],
        ) -> [[f32; ROWS]; R] {
            let mut acc = [[_mm256_setzero_ps(); ROWS]; R];
            for b in 0..nb {
                let dw = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(ws.add(b * ROWS).cast()) });
                let mut d = [[0f32; ROWS]; R];
                for (j, dj) in d.iter_mut().enumerate() {
                    let dx = unsafe { *xs.add(j * nb + b) };
                    unsafe { _mm_storeu_ps(dj.as_mut_ptr(), _mm_mul_ps(dw, _mm_set1_ps(dx))) };
                }
                for r in 0..ROWS {
                    let w = unsafe { _mm256_load_si256(wq.add(b * ROWS + r).cast()) };
                    let aw = $signed!(w);
                    for j in 0..R {
                        let x = unsafe { _mm256_load_si256(xq.add(j * nb + b).cast()) };
                        let dot = $signed_dot!(aw, w, x, xl.wrapping_add(j * nb + b));
                        acc[j][r] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(dot),
                            _mm256_broadcast_ss(&d[j][r]),
                            acc[j][r],
                        );
                    }
                }
            }
            let mut out = [[0f32; ROWS]; R];
            for (o, a) in out.iter_mut().zip(&acc) {
                for (v, s) in o.iter_mut().zip(a) {
                    *v = hsum(*s);
                }
            }
            out
        }

        /// As [`tile`] for a [`super::U4Matrix`] group (`w` = scales, offsets, nibbles):
        /// `Σ_b a·dx·Σ q·x − Σ_b b·dx·Σ x` per (activation row, weight row).
        #[target_feature(enable = $features)]
        pub(super) unsafe fn tile_u4<const R: usize>(
            w: (*const f32, *const f32, *const [u8; 16]),
            nb: usize,
            xs: *const f32,
            xsum: *const f32,
            xq: *const Block,
        ) -> [[f32; ROWS]; R] {
            let (wa, wb, wq) = w;
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [[_mm256_setzero_ps(); ROWS]; R];
            let mut off = [_mm_setzero_ps(); R];
            for b in 0..nb {
                let (a4, b4) = unsafe {
                    (
                        _mm_loadu_ps(wa.add(b * ROWS)),
                        _mm_loadu_ps(wb.add(b * ROWS)),
                    )
                };
                let mut d = [[0f32; ROWS]; R];
                for (j, dj) in d.iter_mut().enumerate() {
                    let (dx, sx) = unsafe { (*xs.add(j * nb + b), *xsum.add(j * nb + b)) };
                    unsafe { _mm_storeu_ps(dj.as_mut_ptr(), _mm_mul_ps(a4, _mm_set1_ps(dx))) };
                    off[j] = _mm_fmadd_ps(b4, _mm_set1_ps(dx * sx), off[j]);
                }
                for r in 0..ROWS {
                    let nibbles = unsafe { _mm_loadu_si128(wq.add(b * ROWS + r).cast()) };
                    let q = _mm256_and_si256(
                        _mm256_set_m128i(_mm_srli_epi16(nibbles, 4), nibbles),
                        low,
                    );
                    for j in 0..R {
                        let x = unsafe { _mm256_load_si256(xq.add(j * nb + b).cast()) };
                        let dot = $dot!(q, x);
                        acc[j][r] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(dot),
                            _mm256_broadcast_ss(&d[j][r]),
                            acc[j][r],
                        );
                    }
                }
            }
            let mut out = [[0f32; ROWS]; R];
            for ((o, a), off) in out.iter_mut().zip(&acc).zip(&off) {
                let mut offs = [0f32; ROWS];
                unsafe { _mm_storeu_ps(offs.as_mut_ptr(), *off) };
                for ((v, s), c) in o.iter_mut().zip(a).zip(offs) {
                    *v = hsum(*s) - c;
                }
            }
            out
        }

        /// As [`tile`] with one activation row, for Q5_0 weights (scales `ws`, high bits `wh`,
        /// nibbles `wq`): each block is widened to signed bytes in registers, as llama.cpp's
        /// AVX2 Q5_0 dot product does, then multiplied exactly as Q8_0.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn tile_q5(
            ws: *const u16,
            wh: *const u32,
            wq: *const [u8; 16],
            nb: usize,
            xs: *const f32,
            xq: *const Block,
            xl: *const [i32; 8],
        ) -> [f32; ROWS] {
            let low = _mm256_set1_epi8(0x0F);
            let spread = _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            );
            let bit_mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
            let all = _mm256_set1_epi64x(-1);
            let mut acc = [_mm256_setzero_ps(); ROWS];
            for b in 0..nb {
                let dw = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(ws.add(b * ROWS).cast()) });
                let mut d = [0f32; ROWS];
                let dx = unsafe { *xs.add(b) };
                unsafe { _mm_storeu_ps(d.as_mut_ptr(), _mm_mul_ps(dw, _mm_set1_ps(dx))) };
                let x = unsafe { _mm256_load_si256(xq.add(b).cast()) };
                let bias = $q5_bias!(xl.wrapping_add(b));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let (bits, nibbles) = unsafe {
                        (
                            *wh.add(b * ROWS + r) as i32,
                            _mm_loadu_si128(wq.add(b * ROWS + r).cast()),
                        )
                    };
                    // Nibbles: low halves are values 0..16, high halves values 16..32.
                    let q = _mm256_and_si256(
                        _mm256_set_m128i(_mm_srli_epi16(nibbles, 4), nibbles),
                        low,
                    );
                    // Byte i = 0xFF where bit i is set.
                    let set = _mm256_cmpeq_epi8(
                        _mm256_or_si256(
                            _mm256_shuffle_epi8(_mm256_set1_epi32(bits), spread),
                            bit_mask,
                        ),
                        all,
                    );
                    let dot = $q5_dot!(q, set, x, bias);
                    *acc =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(&d[r]), *acc);
                }
            }
            let mut out = [0f32; ROWS];
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = hsum(*a);
            }
            out
        }
    };
}

/// `madd(maddubs(u, s), 1)`: AVX2 (the pairwise i16 sums cannot saturate here: weights
/// and activations stay within ±127, or 4-bit weights).
#[cfg(target_arch = "x86_64")]
macro_rules! dot_avx2 {
    ($u:expr, $s:expr) => {
        _mm256_madd_epi16(_mm256_maddubs_epi16($u, $s), _mm256_set1_epi16(1))
    };
}

/// Signed Q8_0 weights `w` against activations `x`, AVX2: `|w|` (per weight block) times
/// `x` with the sign of `w`.
#[cfg(target_arch = "x86_64")]
macro_rules! signed_avx2 {
    ($w:expr) => {
        _mm256_sign_epi8($w, $w)
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! signed_dot_avx2 {
    ($aw:expr, $w:expr, $x:expr, $bias:expr) => {{
        let _ = $bias;
        dot_avx2!($aw, _mm256_sign_epi8($x, $w))
    }};
}

/// Q5_0 in AVX2: `(nibble | bit << 4) − 16 == nibble | (bit ? 0 : 0xF0)` as signed bytes,
/// then as [`signed_dot_avx2`].
#[cfg(target_arch = "x86_64")]
macro_rules! q5_bias_avx2 {
    ($bias:expr) => {{
        let _ = $bias;
        _mm256_setzero_si256()
    }};
}

#[cfg(target_arch = "x86_64")]
macro_rules! q5_dot_avx2 {
    ($q:expr, $set:expr, $x:expr, $bias:expr) => {{
        let w = _mm256_or_si256(
            $q,
            _mm256_andnot_si256($set, _mm256_set1_epi8(0xF0u8 as i8)),
        );
        signed_dot_avx2!(_mm256_sign_epi8(w, w), w, $x, $bias)
    }};
}

/// Signed Q8_0 weights with VNNI: read as `w + 128` (unsigned, one xor per weight block)
/// and the dot product seeded with the activation block's `−128 · Σx` per lane
/// ([`Q8Input::bias`]): `Σ w·x` exactly, in one instruction per pair of blocks.
#[cfg(target_arch = "x86_64")]
macro_rules! signed_vnni {
    ($w:expr) => {
        _mm256_xor_si256($w, _mm256_set1_epi8(-128))
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! signed_dot_vnni {
    ($uw:expr, $w:expr, $x:expr, $bias:expr) => {
        _mm256_dpbusd_epi32(unsafe { _mm256_loadu_si256($bias.cast()) }, $uw, $x)
    };
}

/// Q5_0 with VNNI: the unsigned `nibble | bit << 4` (0..32) against `x`, seeded with
/// `−16 · Σx` per lane (the bias divided by 8, exact).
#[cfg(target_arch = "x86_64")]
macro_rules! q5_bias_vnni {
    ($bias:expr) => {
        _mm256_srai_epi32::<3>(unsafe { _mm256_loadu_si256($bias.cast()) })
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! q5_dot_vnni {
    ($q:expr, $set:expr, $x:expr, $bias:expr) => {
        _mm256_dpbusd_epi32(
            $bias,
            _mm256_or_si256($q, _mm256_and_si256($set, _mm256_set1_epi8(0x10))),
            $x,
        )
    };
}

/// `dpbusd(0, u, s)`: the same sums in one instruction (AVX-512 VNNI on 256-bit vectors).
#[cfg(target_arch = "x86_64")]
macro_rules! dot_vnni {
    ($u:expr, $s:expr) => {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), $u, $s)
    };
}

/// Whether candle's repacked K-quant tiles (16 rows per 512-bit AVX-512 VNNI product) run
/// on this CPU: they beat [`U4Matrix`] on products of many rows (prefill), not on one row.
pub(crate) fn wide_k_quants() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU also has AVX-512 VNNI with 256-bit forms (checked once).
#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        available()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
    })
}

/// Tile kernels with AVX2 alone.
#[cfg(target_arch = "x86_64")]
mod tiles_avx2 {
    use super::avx2::hsum;
    use super::{Block, ROWS};
    use std::arch::x86_64::*;
    tiles!(
        "avx2,fma,f16c",
        dot_avx2,
        signed_avx2,
        signed_dot_avx2,
        q5_bias_avx2,
        q5_dot_avx2
    );
}

/// Tile kernels with AVX-512 VNNI's byte dot product.
#[cfg(target_arch = "x86_64")]
mod tiles_vnni {
    use super::avx2::hsum;
    use super::{Block, ROWS};
    use std::arch::x86_64::*;
    tiles!(
        "avx2,fma,f16c,avx512vnni,avx512vl",
        dot_vnni,
        signed_vnni,
        signed_dot_vnni,
        q5_bias_vnni,
        q5_dot_vnni
    );
}

/// The tile kernels of the best instruction set this CPU has (see `tiles_avx2::tile`).
///
/// # Safety
/// As the kernels': [`available`] must hold and the pointers cover the blocks read.
#[cfg(target_arch = "x86_64")]
unsafe fn tile<const R: usize>(
    ws: *const u16,
    wq: *const Block,
    nb: usize,
    xs: *const f32,
    xq: *const Block,
    xl: *const [i32; 8],
) -> [[f32; ROWS]; R] {
    // The VNNI kernel reads the input's lane biases, which only a CPU with VNNI computes.
    if vnni() && !xl.is_null() {
        unsafe { tiles_vnni::tile::<R>(ws, wq, nb, xs, xq, xl) }
    } else {
        unsafe { tiles_avx2::tile::<R>(ws, wq, nb, xs, xq, xl) }
    }
}

/// As [`tile`] for Q4_K groups (see `tiles_avx2::tile_u4`).
///
/// # Safety
/// As [`tile`].
#[cfg(target_arch = "x86_64")]
unsafe fn tile_u4<const R: usize>(
    w: (*const f32, *const f32, *const [u8; 16]),
    nb: usize,
    xs: *const f32,
    xsum: *const f32,
    xq: *const Block,
) -> [[f32; ROWS]; R] {
    if vnni() {
        unsafe { tiles_vnni::tile_u4::<R>(w, nb, xs, xsum, xq) }
    } else {
        unsafe { tiles_avx2::tile_u4::<R>(w, nb, xs, xsum, xq) }
    }
}

/// As [`tile`] for one activation row and Q5_0 groups (see `tiles_avx2::tile_q5`).
///
/// # Safety
/// As [`tile`].
#[cfg(target_arch = "x86_64")]
unsafe fn tile_q5(
    ws: *const u16,
    wh: *const u32,
    wq: *const [u8; 16],
    nb: usize,
    xs: *const f32,
    xq: *const Block,
    xl: *const [i32; 8],
) -> [f32; ROWS] {
    if vnni() && !xl.is_null() {
        unsafe { tiles_vnni::tile_q5(ws, wh, wq, nb, xs, xq, xl) }
    } else {
        unsafe { tiles_avx2::tile_q5(ws, wh, wq, nb, xs, xq, xl) }
    }
}

/// The [`Wide`] kernel (AVX-512 VNNI, 512-bit).
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::{Q8Input, QK, WIDE, WideBlock};
    use std::arch::x86_64::*;

    /// Input rows `t .. t + R` (`x`) times one 16-row tile (`w` = its blocks' scales and
    /// values) into `out` (row `j` at `out + j·stride`, 16 values each). Per block and
    /// input row: 8 byte dot products, seeded with `−128 · Σx`, give the 16 rows' exact
    /// integer sums; one conversion and one multiply-add by the rows' scales times the
    /// input's.
    ///
    /// # Safety
    /// 512-bit VNNI must be available; `w` must point at the tile's `nb` blocks, `x` hold
    /// rows `t .. t + R`, and `out` 16 writable values at each of the R row offsets.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize>(
        w: (*const [f32; WIDE], *const WideBlock),
        nb: usize,
        x: &Q8Input,
        t: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let mut isum = [_mm512_setzero_si512(); R];
            for (j, s) in isum.iter_mut().enumerate() {
                // Block sums are exact integers (at most 32 · 127 in magnitude).
                *s = _mm512_set1_epi32(-128 * x.sums[(t + j) * nb + b] as i32);
            }
            let wq = unsafe { &(*w.1.add(b)).0 };
            for c in 0..QK / 4 {
                let wv = unsafe { _mm512_load_si512(wq.as_ptr().add(c * WIDE * 4).cast()) };
                for (j, s) in isum.iter_mut().enumerate() {
                    let xb = &x.qs[(t + j) * nb + b].0[c * 4..c * 4 + 4];
                    let four =
                        i32::from_le_bytes([xb[0] as u8, xb[1] as u8, xb[2] as u8, xb[3] as u8]);
                    *s = _mm512_dpbusd_epi32(*s, wv, _mm512_set1_epi32(four));
                }
            }
            let d = unsafe { _mm512_loadu_ps((*w.0.add(b)).as_ptr()) };
            for (j, a) in acc.iter_mut().enumerate() {
                let dx = _mm512_set1_ps(x.scales[(t + j) * nb + b]);
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j]), _mm512_mul_ps(d, dx), *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            unsafe { _mm512_storeu_ps(out.add(j * stride), *a) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::QK;
    use std::arch::x86_64::*;

    /// Quantizes 32 values at `x` into `q`; returns the f16-rounded scale.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(x: *const f32, q: &mut [i8; QK]) -> f32 {
        let v = unsafe {
            [
                _mm256_loadu_ps(x),
                _mm256_loadu_ps(x.add(8)),
                _mm256_loadu_ps(x.add(16)),
                _mm256_loadu_ps(x.add(24)),
            ]
        };
        let sign = _mm256_set1_ps(-0.0);
        let mut amax = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, *vi));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let d16 = _mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(d)));
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let i0 = scale_round(v[0], id);
        let i1 = scale_round(v[1], id);
        let i2 = scale_round(v[2], id);
        let i3 = scale_round(v[3], id);
        // Packing interleaves 128-bit lanes; the permute puts the values back in order.
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), p) };
        _mm_cvtss_f32(d16)
    }

    /// `q[i] = clamp(round_half_even(x[i] · iscale), -128, 127)` for 32 values at `x` (packing
    /// saturates, which is the clamp).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_block(x: *const f32, iscale: f32, q: &mut [i8; QK]) {
        let id = _mm256_set1_ps(iscale);
        let (i0, i1, i2, i3) = unsafe {
            (
                scale_round(_mm256_loadu_ps(x), id),
                scale_round(_mm256_loadu_ps(x.add(8)), id),
                scale_round(_mm256_loadu_ps(x.add(16)), id),
                scale_round(_mm256_loadu_ps(x.add(24)), id),
            )
        };
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), p) };
    }

    /// `round_half_even(x · id)` as i32.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale_round(x: __m256, id: __m256) -> __m256i {
        _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm256_mul_ps(x, id)))
    }

    /// `exp(x)` for 8 lanes: `x = n·ln2 + r`, |r| <= ln2/2, a degree-6 polynomial for
    /// `exp(r)` (Cephes' `expf` coefficients), `2ⁿ` built in the exponent bits. Inputs are
    /// clamped to [-87.3, 88.7] (results stay finite and normal).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.7),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // r = x - n·ln2, with ln2 split in two so the product is exact enough.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5e-1,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(e, _mm256_castsi256_ps(pow2))
    }

    /// `gate[i] = gelu_tanh(gate[i]) · up[i]` over `n` values (see the safe wrapper).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gelu_tanh_mul(gate: *mut f32, up: *const f32, n: usize) {
        let k = _mm256_set1_ps(-2.0 * 0.797_884_6);
        let c = _mm256_set1_ps(0.044715);
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let (x, u) = unsafe { (_mm256_loadu_ps(gate.add(i)), _mm256_loadu_ps(up.add(i))) };
            // -2u = -2·√(2/π)·x·(1 + 0.044715·x²)
            let inner = _mm256_mul_ps(
                _mm256_mul_ps(k, x),
                _mm256_fmadd_ps(c, _mm256_mul_ps(x, x), one),
            );
            let g = _mm256_div_ps(x, _mm256_add_ps(one, exp(inner)));
            unsafe { _mm256_storeu_ps(gate.add(i), _mm256_mul_ps(g, u)) };
            i += 8;
        }
        while i < n {
            unsafe { *gate.add(i) = super::gelu_tanh(*gate.add(i)) * *up.add(i) };
            i += 1;
        }
    }

    /// See the safe [`super::exp_shifted_sum`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp_shifted_sum(s: *mut f32, n: usize, shift: f32) -> f32 {
        let m = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp(_mm256_sub_ps(unsafe { _mm256_loadu_ps(s.add(i)) }, m));
            unsafe { _mm256_storeu_ps(s.add(i), e) };
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut sum = hsum(acc);
        while i < n {
            let e = unsafe { (*s.add(i) - shift).exp() };
            unsafe { *s.add(i) = e };
            sum += e;
            i += 1;
        }
        sum
    }

    /// See the safe [`super::dots`]; `g <= MAX_HEADS`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots(q: *const f32, k: *const f32, d: usize, out: *mut f32, g: usize) {
        let mut acc = [_mm256_setzero_ps(); super::MAX_HEADS];
        let mut i = 0;
        while i + 8 <= d {
            let kv = unsafe { _mm256_loadu_ps(k.add(i)) };
            for (h, acc) in acc.iter_mut().enumerate().take(g) {
                *acc = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(q.add(h * d + i)) }, kv, *acc);
            }
            i += 8;
        }
        for (h, acc) in acc.iter().enumerate().take(g) {
            let mut sum = hsum(*acc);
            for t in i..d {
                sum += unsafe { *q.add(h * d + t) * *k.add(t) };
            }
            unsafe { *out.add(h) = sum };
        }
    }

    /// See the safe [`super::axpys`]; `g <= MAX_HEADS`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpys(out: *mut f32, p: *const f32, g: usize, v: *const f32, d: usize) {
        let mut ps = [_mm256_setzero_ps(); super::MAX_HEADS];
        for (h, ph) in ps.iter_mut().enumerate().take(g) {
            *ph = _mm256_set1_ps(unsafe { *p.add(h) });
        }
        let mut i = 0;
        while i + 8 <= d {
            let vv = unsafe { _mm256_loadu_ps(v.add(i)) };
            for (h, ph) in ps.iter().enumerate().take(g) {
                unsafe {
                    let o = out.add(h * d + i);
                    _mm256_storeu_ps(o, _mm256_fmadd_ps(*ph, vv, _mm256_loadu_ps(o)));
                }
            }
            i += 8;
        }
        for h in 0..g {
            for t in i..d {
                unsafe { *out.add(h * d + t) += *p.add(h) * *v.add(t) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    /// Deterministic values with a spread of magnitudes and signs.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 33) as f32) / (1u64 << 31) as f32 - 0.5;
                u * if i % 7 == 0 { 9.0 } else { 1.0 }
            })
            .collect()
    }

    /// candle's product of `x` (rows × k) with the weights of `m`.
    fn candle_product(m: &QMatMul, x: &[f32], rows: usize, k: usize) -> Vec<f32> {
        m.forward(&Tensor::from_vec(x.to_vec(), (rows, k), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// `got` (row t of `x` times weight row `row`) is within the activation quantization's
    /// error of the exact product of the stored weights `dense_row`: each quantized value
    /// is off by at most half its block's step |d|, so the sum by at most Σ |w| · |d| / 2.
    fn assert_within_quantization_error(
        got: f32,
        dense_row: &[f32],
        x: &[f32],
        q: &Q8Input,
        t: usize,
        label: &str,
    ) {
        let k = dense_row.len();
        let exact: f32 = dense_row
            .iter()
            .zip(&x[t * k..(t + 1) * k])
            .map(|(a, b)| a * b)
            .sum();
        let bound: f32 = (0..k)
            .map(|c| dense_row[c].abs() * q.scales[t * (k / QK) + c / QK].abs() * 0.51)
            .sum();
        assert!(
            (got - exact).abs() <= bound + 1e-4 * exact.abs(),
            "{label}: {got} vs exact {exact}"
        );
    }

    fn q8_tensor(n: usize, k: usize, seed: u64) -> QTensor {
        quantized(n, k, seed, GgmlDType::Q8_0)
    }

    /// A (n, k) matrix of [`values`] quantized by candle.
    fn quantized(n: usize, k: usize, seed: u64, dtype: GgmlDType) -> QTensor {
        let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    /// A Q5_0 matrix in Chartline's forms; `None` on a CPU without the kernels.
    fn q5_matrix(n: usize, k: usize, seed: u64) -> Option<Q8Matrix> {
        let q5 = quantized(n, k, seed, GgmlDType::Q5_0);
        Q8Matrix::from_q5_0(&q5.data().unwrap(), n, k).unwrap()
    }

    /// A Q4_K matrix in Chartline's form; `None` on a CPU without the kernels.
    fn q4k_matrix(n: usize, k: usize, seed: u64) -> Option<U4Matrix> {
        U4Matrix::from_qtensor(&quantized(n, k, seed, GgmlDType::Q4K)).unwrap()
    }

    #[test]
    fn rows_dequantize_exactly_as_candle() {
        let t = q8_tensor(12, 96, 1);
        let m = Q8Matrix::from_blocks(&t.data().unwrap(), 12, 96).unwrap();
        let want: Vec<Vec<f32>> = t.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
        let ids = [0u32, 5, 11, 3];
        let got = m.rows(&ids).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(
                &got[i * 96..(i + 1) * 96],
                want[id as usize].as_slice(),
                "row {id}"
            );
        }
        assert!(m.rows(&[12]).is_err(), "an id past the last row is refused");
    }

    #[test]
    fn quantization_matches_the_reference_and_rounds_ties_to_even() {
        let x = values(64 * 5, 2);
        let q = Q8Input::quantize(&x, 5, 64).unwrap();
        for (i, chunk) in x.chunks_exact(QK).enumerate() {
            let mut want = [0i8; QK];
            let d = quantize_block_reference(chunk, &mut want);
            assert_eq!(q.qs[i].0, want, "block {i}");
            assert_eq!(q.scales[i], d, "scale {i}");
        }
        // 127 · 0.5 / 127 lands on 0.5 exactly: ties go to even (0), as llama.cpp's AVX2.
        let mut tie = vec![0f32; QK];
        tie[0] = 127.0;
        tie[1] = 0.5;
        tie[2] = 1.5;
        tie[3] = -2.5;
        let q = Q8Input::quantize(&tie, 1, QK).unwrap();
        assert_eq!(&q.qs[0].0[..4], &[127, 0, 2, -2]);
        let zeros = Q8Input::quantize(&[0f32; QK], 1, QK).unwrap();
        assert_eq!(zeros.qs[0].0, [0; QK]);
        assert_eq!(zeros.scales[0], 0.0);
    }

    #[test]
    fn products_equal_candles_q8_0_matmul_for_every_tile_shape() {
        let (n, k) = (16, 160);
        let t = q8_tensor(n, k, 3);
        let mine = Q8Matrix::from_qtensor(&t).unwrap();
        let candle = QMatMul::from_qtensor(q8_tensor(n, k, 3)).unwrap();
        let dense: Vec<Vec<f32>> = t.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
        for m in [1, 2, 3, 4, 5, 7] {
            let x = values(m * k, 10 + m as u64);
            let q = Q8Input::quantize(&x, m, k).unwrap();
            let mut reference = vec![0f32; m * n];
            let m8 = Q8Matrix::from_blocks(&t.data().unwrap(), n, k).unwrap();
            m8.matmul_reference(&q, &mut reference);
            let theirs = candle_product(&candle, &x, m, k);
            if let Some(mine) = &mine {
                let mut got = vec![0f32; m * n];
                mine.matmul(&q, &mut got).unwrap();
                for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
                    assert!(
                        (g - r).abs() <= 1e-5 * r.abs().max(1.0),
                        "m {m} #{i}: {g} vs {r}"
                    );
                }
            }
            for t_ in 0..m {
                for (row, dense_row) in dense.iter().enumerate() {
                    let i = t_ * n + row;
                    // candle quantizes activations the same way (ties aside), so the products
                    // agree closely; both stay near the exact product of the stored weights.
                    assert!(
                        (reference[i] - theirs[i]).abs() <= 1e-3 * theirs[i].abs().max(1.0),
                        "m {m} #{i}: {} vs candle {}",
                        reference[i],
                        theirs[i]
                    );
                    assert_within_quantization_error(
                        reference[i],
                        dense_row,
                        &x,
                        &q,
                        t_,
                        &format!("m {m} #{i}"),
                    );
                }
            }
        }
    }

    #[test]
    fn q5_0_matrices_hold_candles_values_and_one_token_products_equal_the_q8_0_path() {
        let (n, k) = (12, 128);
        let w = Tensor::from_vec(values(n * k, 8), (n, k), &Device::Cpu).unwrap();
        let q5 = QTensor::quantize(&w, GgmlDType::Q5_0).unwrap();
        let Some(m) = Q8Matrix::from_q5_0(&q5.data().unwrap(), n, k).unwrap() else {
            return; // a CPU without the kernels
        };
        // The widened Q8_0 form holds exactly candle's Q5_0 values.
        let want: Vec<Vec<f32>> = q5.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
        let ids: Vec<u32> = (0..n as u32).collect();
        let rows = m.rows(&ids).unwrap();
        for (i, want) in want.iter().enumerate() {
            assert_eq!(&rows[i * k..(i + 1) * k], want.as_slice(), "row {i}");
        }
        // One token reads the 5-bit form; the same integer products give the same sums as
        // the Q8_0 form (the prefill path, which two tokens take).
        let x = values(2 * k, 9);
        let one = Q8Input::quantize(&x[..k], 1, k).unwrap();
        let two = Q8Input::quantize(&x, 2, k).unwrap();
        let mut got = vec![0f32; n];
        m.matmul(&one, &mut got).unwrap();
        let mut wide = vec![0f32; 2 * n];
        m.matmul(&two, &mut wide).unwrap();
        let mut reference = vec![0f32; n];
        m.matmul_reference(&one, &mut reference);
        for i in 0..n {
            assert!(
                (got[i] - wide[i]).abs() <= 1e-5 * wide[i].abs().max(1.0),
                "#{i}: {} vs {}",
                got[i],
                wide[i]
            );
            assert!(
                (got[i] - reference[i]).abs() <= 1e-5 * reference[i].abs().max(1.0),
                "#{i}"
            );
        }
    }

    #[test]
    fn one_pass_over_several_matrices_equals_each_product_alone() {
        // Query/key/value and gate/up in one dispatch: a Q5_0, a Q8_0 and a Q4_K matrix of
        // different heights reading one input; every output must equal the matrix's own
        // reference product, and no output may be left unwritten.
        let k = 256;
        let x = values(k, 40);
        let Some(a) = q5_matrix(20, k, 41) else {
            return; // a CPU without the kernels
        };
        let b = Q8Matrix::from_qtensor(&q8_tensor(8, k, 42))
            .unwrap()
            .unwrap();
        let c = q4k_matrix(12, k, 43).unwrap();
        let x8 = Q8Input::quantize(&x, 1, k).unwrap();
        let xk = Q8Input::quantize_k(&x, 1, k).unwrap();
        let (mut oa, mut ob, mut oc) = (vec![f32::NAN; 20], vec![f32::NAN; 8], vec![f32::NAN; 12]);
        matvecs(
            Some(&x8),
            Some(&xk),
            &mut [
                (Packed::Q8(&a), &mut oa),
                (Packed::Q8(&b), &mut ob),
                (Packed::U4(&c), &mut oc),
            ],
        )
        .unwrap();
        let (mut ra, mut rb, mut rc) = (vec![0f32; 20], vec![0f32; 8], vec![0f32; 12]);
        a.matmul_reference(&x8, &mut ra);
        b.matmul_reference(&x8, &mut rb);
        c.matmul_reference(&xk, &mut rc);
        for (got, want) in [(&oa, &ra), (&ob, &rb), (&oc, &rc)] {
            for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "#{i}: {g} vs {w}");
            }
        }
        // A matrix without the input of its kind is refused, not skipped.
        let mut out = vec![0f32; 12];
        assert!(matvecs(Some(&x8), None, &mut [(Packed::U4(&c), &mut out)]).is_err());
        let mut short = vec![0f32; 7];
        assert!(matvecs(Some(&x8), None, &mut [(Packed::Q8(&b), &mut short)]).is_err());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_and_avx2_tiles_give_identical_sums() {
        // The VNNI kernels (unsigned weights with a bias seed) compute the same integer dot
        // products as the AVX2 ones (sign tricks), so every float operation after them is
        // the same: the sums must be equal bit for bit. Only a CPU with both can compare.
        if !vnni() {
            return;
        }
        let (n, k) = (8, 256);
        let m8 = Q8Matrix::from_qtensor(&q8_tensor(n, k, 50))
            .unwrap()
            .unwrap();
        let m5 = q5_matrix(n, k, 51).unwrap();
        let m4 = q4k_matrix(n, k, 52).unwrap();
        // Extreme activations too: a block at ±127 and one of zeros.
        let mut xv = values(3 * k, 53);
        xv[..32]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = if i % 2 == 0 { 5.0 } else { -5.0 });
        xv[32..64].fill(0.0);
        let x = Q8Input::quantize(&xv, 3, k).unwrap();
        let xk = Q8Input::quantize_k(&xv, 3, k).unwrap();
        let nb = k / QK;
        // Weights at the ends of the byte range (−128 reads as 0 + 128 in the VNNI form
        // and as |−128| = 128 unsigned in the AVX2 one), raw Q8_0 blocks with scale 1.0.
        let mut raw = Vec::new();
        for row in 0..ROWS {
            for b in 0..nb {
                raw.extend_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
                raw.extend((0..QK).map(|i| match (row + b + i) % 3 {
                    0 => 0x80u8,
                    1 => 0x7F,
                    _ => (i as u8).wrapping_mul(37),
                }));
            }
        }
        let edge = Q8Matrix::from_blocks(&raw, ROWS, k).unwrap();
        // SAFETY: both instruction sets were detected; one group, three input rows.
        let (a, b) = unsafe {
            let args = (edge.scales.as_ptr(), edge.qs.as_ptr(), nb);
            let (xs, xq, xl) = (x.scales_at(0), x.blocks_at(0), x.bias_at(0));
            (
                tiles_avx2::tile::<3>(args.0, args.1, args.2, xs, xq, xl),
                tiles_vnni::tile::<3>(args.0, args.1, args.2, xs, xq, xl),
            )
        };
        assert_eq!(a, b, "Q8_0 with −128 and 127 weights");
        let mut reference = vec![0f32; 3 * ROWS];
        edge.matmul_reference(&x, &mut reference);
        for (j, row) in b.iter().enumerate() {
            for (r, v) in row.iter().enumerate() {
                let want = reference[j * ROWS + r];
                assert!(
                    (v - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{v} vs {want}"
                );
            }
        }
        for g in 0..n / ROWS {
            let at = g * nb * ROWS;
            let (ws, wq) = (m8.scales[at..].as_ptr(), m8.qs[at..].as_ptr());
            let (xs, xq, xl) = (x.scales_at(0), x.blocks_at(0), x.bias_at(0));
            // SAFETY: both instruction sets were detected; the group's blocks and the three
            // input rows are inside their arrays.
            unsafe {
                let a = tiles_avx2::tile::<3>(ws, wq, nb, xs, xq, xl);
                let b = tiles_vnni::tile::<3>(ws, wq, nb, xs, xq, xl);
                assert_eq!(a, b, "Q8_0 group {g}");
                let q5r = m5.q5.as_ref().unwrap();
                let w = (
                    q5r.scales[at..].as_ptr(),
                    q5r.qh[at..].as_ptr(),
                    q5r.qs[at..].as_ptr(),
                );
                let a = tiles_avx2::tile_q5(w.0, w.1, w.2, nb, xs, xq, xl);
                let b = tiles_vnni::tile_q5(w.0, w.1, w.2, nb, xs, xq, xl);
                assert_eq!(a, b, "Q5_0 group {g}");
                let w = (
                    m4.scales[at..].as_ptr(),
                    m4.offsets[at..].as_ptr(),
                    m4.qs[at..].as_ptr(),
                );
                let (ks, ksum, kq) = (xk.scales_at(0), xk.sums_at(0), xk.blocks_at(0));
                let a = tiles_avx2::tile_u4::<3>(w, nb, ks, ksum, kq);
                let b = tiles_vnni::tile_u4::<3>(w, nb, ks, ksum, kq);
                assert_eq!(a, b, "Q4_K group {g}");
            }
        }
    }

    #[test]
    fn sixteen_row_tiles_multiply_like_the_reference_for_every_row_count() {
        // Prefill's 512-bit tiles (where the CPU has them): Q8_0 and Q5_0 matrices of 32
        // rows, 1 to 9 input rows (every tail of the 4-row steps), against the plain-Rust
        // product of the same quantized values; the 4-row form stays as it was.
        let (n, k) = (32, 96);
        let Some(m5) = q5_matrix(n, k, 60) else {
            return; // a CPU without the kernels
        };
        let m8 = Q8Matrix::from_qtensor(&q8_tensor(n, k, 61))
            .unwrap()
            .unwrap();
        let m5 = m5.with_wide();
        if m5.wide.is_none() {
            return; // no 512-bit VNNI here: nothing to compare
        }
        // The Q5_0 matrix keeps only its 5-bit form and the tiles, which still hold
        // exactly candle's values.
        assert!(m5.qs.is_empty());
        let want: Vec<Vec<f32>> = quantized(n, k, 60, GgmlDType::Q5_0)
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        let rows = m5.rows(&(0..n as u32).collect::<Vec<_>>()).unwrap();
        for (i, want) in want.iter().enumerate() {
            assert_eq!(&rows[i * k..(i + 1) * k], want.as_slice(), "row {i}");
        }
        for m in [m5, m8.with_wide()] {
            for rows in 1..=9 {
                let x = Q8Input::quantize(&values(rows * k, 62 + rows as u64), rows, k).unwrap();
                let mut got = vec![f32::NAN; rows * n];
                m.matmul(&x, &mut got).unwrap();
                let mut want = vec![0f32; rows * n];
                m.matmul_reference(&x, &mut want);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "rows {rows} #{i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_gelu_matches_candles_gelu_times_up() {
        // A sweep through GELU's range, the saturated tails and zero included.
        let mut x: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 400.0).collect();
        x.extend([
            0.0, -0.0, 1e-8, -1e-8, 30.0, -30.0, 100.0, -100.0, 1e4, -1e4,
        ]);
        let up: Vec<f32> = (0..x.len()).map(|i| 0.5 + (i % 13) as f32 / 7.0).collect();
        let t = Tensor::from_vec(x.clone(), x.len(), &Device::Cpu).unwrap();
        let u = Tensor::from_vec(up.clone(), x.len(), &Device::Cpu).unwrap();
        let want: Vec<f32> = (t.gelu().unwrap() * u).unwrap().to_vec1().unwrap();
        let mut got = x.clone();
        gelu_tanh_mul(&mut got, &up);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // candle's `1 + tanh(u)` loses everything below one ulp of 1 where tanh nears
            // -1 (it returns 0 from x ≈ -9 on): allow that absolute error, x · up · ε.
            assert!(
                (g - w).abs() <= 4.0 * f32::EPSILON * w.abs() + f32::EPSILON * (x[i] * up[i]).abs(),
                "x {}: {g} vs candle {w}",
                x[i]
            );
        }
    }

    #[test]
    fn q8_k_quantization_matches_the_plain_rounding_rule() {
        let mut x = values(2 * QK_K, 50);
        x[3] = 1e-3 * x[3].signum(); // small values
        x[QK_K + 7] = -40.0; // a negative largest value flips the scale's sign
        let q = Q8Input::quantize_k(&x, 1, 2 * QK_K).unwrap();
        for (c, chunk) in x.chunks_exact(QK_K).enumerate() {
            let max = chunk
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let iscale = -127.0 / max;
            for (i, &v) in chunk.iter().enumerate() {
                let want = (iscale * v).round_ties_even().clamp(-128.0, 127.0) as i8;
                assert_eq!(q.qs[c * 8 + i / QK].0[i % QK], want, "chunk {c} value {i}");
            }
            assert_eq!(q.scales[c * 8], 1.0 / iscale);
        }
        assert!(q.scales[8] > 0.0, "largest value negative: positive scale");
        let zeros = Q8Input::quantize_k(&[0f32; QK_K], 1, QK_K).unwrap();
        assert!(zeros.qs.iter().all(|b| b.0 == [0; QK]) && zeros.scales.iter().all(|&d| d == 0.0));
    }

    #[test]
    fn q4_k_matrices_hold_candles_values_and_multiply_like_candle() {
        let (n, k) = (8, 512);
        let w = Tensor::from_vec(values(n * k, 30), (n, k), &Device::Cpu).unwrap();
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let Some(m) = U4Matrix::from_qtensor(&q4).unwrap() else {
            return; // a CPU without the kernels
        };
        let dense: Vec<Vec<f32>> = q4.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
        for (i, want) in dense.iter().enumerate() {
            assert_eq!(m.row(i), *want, "row {i}");
        }
        let candle = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K).unwrap()).unwrap();
        for rows in [1, 2, 3, 4, 5] {
            let x = values(rows * k, 31 + rows as u64);
            let q = Q8Input::quantize_k(&x, rows, k).unwrap();
            let mut got = vec![0f32; rows * n];
            m.matmul(&q, &mut got).unwrap();
            let mut reference = vec![0f32; rows * n];
            m.matmul_reference(&q, &mut reference);
            let theirs = candle_product(&candle, &x, rows, k);
            for t in 0..rows {
                for (row, dense_row) in dense.iter().enumerate() {
                    let i = t * n + row;
                    assert!(
                        (got[i] - reference[i]).abs() <= 1e-4 * reference[i].abs().max(1.0),
                        "rows {rows} #{i}: {} vs {}",
                        got[i],
                        reference[i]
                    );
                    assert_within_quantization_error(
                        got[i],
                        dense_row,
                        &x,
                        &q,
                        t,
                        &format!("rows {rows} #{i}"),
                    );
                    // candle quantizes activations the same way (Q8_K, ties aside) and sums
                    // in another order: equal up to rounding.
                    assert!(
                        (got[i] - theirs[i]).abs() <= 1e-4 * theirs[i].abs().max(1.0),
                        "rows {rows} #{i}: {} vs candle {}",
                        got[i],
                        theirs[i]
                    );
                }
            }
        }
    }

    #[test]
    fn grouped_dots_and_axpys_agree_with_plain_loops() {
        for (g, d) in [(1, 256), (4, 256), (2, 40), (8, 7), (3, 0)] {
            let q = values(g * d, 20 + d as u64);
            let k = values(d, 40 + g as u64);
            let mut got = vec![0f32; g];
            dots(&q, &k, &mut got);
            for h in 0..g {
                let want: f64 = (0..d)
                    .map(|i| f64::from(q[h * d + i]) * f64::from(k[i]))
                    .sum();
                assert!(
                    (f64::from(got[h]) - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "dots g {g} d {d} h {h}"
                );
            }
            let p: Vec<f32> = (0..g).map(|h| 0.25 + h as f32).collect();
            let mut out = q.clone();
            axpys(&mut out, &p, &k);
            for h in 0..g {
                for i in 0..d {
                    let want = q[h * d + i] + p[h] * k[i];
                    assert!(
                        (out[h * d + i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "axpys g {g} d {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_the_kernels_cannot_take_are_left_to_candle() {
        assert!(
            Q8Matrix::from_qtensor(&q8_tensor(6, 64, 4))
                .unwrap()
                .is_none(),
            "6 rows"
        );
        let w = Tensor::from_vec(values(8 * 256, 5), (8, 256), &Device::Cpu).unwrap();
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        assert!(Q8Matrix::from_qtensor(&q4).unwrap().is_none(), "Q4_K");
        let m = Q8Matrix::from_blocks(&q8_tensor(8, 64, 6).data().unwrap(), 8, 64).unwrap();
        let q = Q8Input::quantize(&values(96, 7), 1, 96).unwrap();
        assert!(m.matmul(&q, &mut [0.0; 8]).is_err(), "k mismatch");
    }
}
