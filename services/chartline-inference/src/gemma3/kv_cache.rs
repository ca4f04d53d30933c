//! Per-layer key/value cache.
//!
//! Grows by doubling (amortised copies) instead of concatenating every step. A sliding-window
//! layer drops, whenever it has to grow, the entries no future query can see, so its memory
//! stays near twice the window however long the sequence gets.

use candle_core::{DType, Device, Result, Tensor};

pub(crate) struct KvCache {
    /// (1, n_kv_heads, capacity, head_dim), valid up to `len`.
    k: Option<Tensor>,
    /// (1, n_kv_heads, capacity, value_dim), valid up to `len`.
    v: Option<Tensor>,
    /// Absolute position of slot 0.
    start: usize,
    len: usize,
    window: Option<usize>,
    max_positions: usize,
    /// Times the buffers were reallocated (each copies what is kept).
    reallocations: usize,
}

/// The cached keys and values after an append, covering absolute positions
/// `start .. start + k.dim(2)`.
pub(crate) struct CachedKv {
    pub k: Tensor,
    pub v: Tensor,
    pub start: usize,
}

const MIN_CAPACITY: usize = 64;

impl KvCache {
    pub(crate) fn new(window: Option<usize>, max_positions: usize) -> Self {
        KvCache {
            k: None,
            v: None,
            start: 0,
            len: 0,
            window,
            max_positions,
            reallocations: 0,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.k = None;
        self.v = None;
        self.start = 0;
        self.len = 0;
    }

    /// Number of positions appended so far (the next position).
    pub(crate) fn next_pos(&self) -> usize {
        self.start + self.len
    }

    /// Appends one position's keys and values (`heads` rows each, on the CPU).
    pub(crate) fn append_one(
        &mut self,
        k: &[f32],
        v: &[f32],
        heads: usize,
        pos: usize,
    ) -> Result<CachedKv> {
        if heads == 0 || !k.len().is_multiple_of(heads) || !v.len().is_multiple_of(heads) {
            candle_core::bail!("{} keys and {} values for {heads} heads", k.len(), v.len());
        }
        let k = Tensor::from_slice(k, (1, heads, 1, k.len() / heads), &Device::Cpu)?;
        let v = Tensor::from_slice(v, (1, heads, 1, v.len() / heads), &Device::Cpu)?;
        self.append(&k, &v, pos)
    }

    /// Appends `k`, `v` of shape (1, n_kv_heads, L, d) for positions `pos .. pos + L`.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor, pos: usize) -> Result<CachedKv> {
        if pos != self.next_pos() {
            candle_core::bail!(
                "kv cache at position {} cannot append at {pos}",
                self.next_pos()
            );
        }
        let (b, heads, l, kd) = k.dims4()?;
        let vd = v.dim(3)?;
        let capacity = self.k.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if self.len + l > capacity {
            // Entries before the oldest position the first new query can see are dead.
            let dead = match self.window {
                Some(w) => (pos + 1)
                    .saturating_sub(w)
                    .saturating_sub(self.start)
                    .min(self.len),
                None => 0,
            };
            let keep = self.len - dead;
            let need = keep + l;
            // A windowed cache tops out at about twice its window (plus the chunk being
            // appended) so that each compaction frees at least a window's worth of slots;
            // a global one grows up to the positions prepared.
            let limit = match self.window {
                Some(w) => 2 * w + l,
                None => self.max_positions,
            };
            // Grow geometrically (at least doubling) so that a windowed cache at its window
            // reaches twice the window and then compacts once per window's worth of steps,
            // not on every step (dropping one dead entry would free one slot).
            let new_capacity = need
                .next_power_of_two()
                .max(MIN_CAPACITY)
                .max(2 * capacity)
                .min(limit)
                .max(need);
            let device: Device = k.device().clone();
            let nk = Tensor::zeros((b, heads, new_capacity, kd), DType::F32, &device)?;
            let nv = Tensor::zeros((b, heads, new_capacity, vd), DType::F32, &device)?;
            if let (Some(ok), Some(ov)) = (&self.k, &self.v)
                && keep > 0
            {
                nk.slice_set(&ok.narrow(2, dead, keep)?.contiguous()?, 2, 0)?;
                nv.slice_set(&ov.narrow(2, dead, keep)?.contiguous()?, 2, 0)?;
            }
            self.k = Some(nk);
            self.v = Some(nv);
            self.start += dead;
            self.len = keep;
            self.reallocations += 1;
        }
        let (Some(ck), Some(cv)) = (&self.k, &self.v) else {
            candle_core::bail!("kv cache buffers missing after growth");
        };
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += l;
        Ok(CachedKv {
            k: ck.narrow(2, 0, self.len)?,
            v: cv.narrow(2, 0, self.len)?,
            start: self.start,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn step(pos: usize, l: usize) -> Tensor {
        // Value = absolute position, so we can check what the cache kept.
        let data: Vec<f32> = (pos..pos + l).flat_map(|p| [p as f32, p as f32]).collect();
        Tensor::from_vec(data, (1, 1, l, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn global_cache_keeps_everything() {
        let mut c = KvCache::new(None, 10_000);
        let mut pos = 0;
        for l in [100, 1, 1, 300] {
            let t = step(pos, l);
            let kv = c.append(&t, &t, pos).unwrap();
            pos += l;
            assert_eq!(kv.start, 0);
            assert_eq!(kv.k.dim(2).unwrap(), pos);
        }
        let kv = c.append(&step(pos, 1), &step(pos, 1), pos).unwrap();
        let first: Vec<f32> =
            kv.k.narrow(2, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        assert_eq!(first, vec![0.0, 0.0]);
    }

    #[test]
    fn sliding_cache_stays_bounded_and_keeps_the_window() {
        let window = 8;
        let mut c = KvCache::new(Some(window), 10_000);
        for pos in 0..1000 {
            let t = step(pos, 1);
            let kv = c.append(&t, &t, pos).unwrap();
            let n = kv.k.dim(2).unwrap();
            assert!(n <= 2 * window + MIN_CAPACITY, "bounded: {n}");
            // The window of the newest query must be present.
            assert!(
                kv.start + window <= pos + 1 || kv.start == 0,
                "window kept at {pos}"
            );
            let last: Vec<f32> =
                kv.k.narrow(2, n - 1, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
            assert_eq!(last, vec![pos as f32, pos as f32]);
            let first: Vec<f32> =
                kv.k.narrow(2, 0, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
            assert_eq!(first[0] as usize, kv.start, "slot 0 holds position start");
        }
    }

    #[test]
    fn a_sliding_cache_past_its_window_copies_once_per_window_not_every_step() {
        // Gemma's local layers: a 512-token prompt fills the window, then one token at a
        // time. Reallocating (and copying the whole window) on every step cost more than
        // the attention itself.
        let window = 512;
        let mut c = KvCache::new(Some(window), 4096);
        c.append(&step(0, 512), &step(0, 512), 0).unwrap();
        let after_prompt = c.reallocations;
        for pos in 512..512 + 1024 {
            let t = step(pos, 1);
            let kv = c.append(&t, &t, pos).unwrap();
            assert!(kv.start + window <= pos + 1, "window kept at {pos}");
        }
        let copies = c.reallocations - after_prompt;
        assert!(copies <= 3, "{copies} reallocations in 1024 steps");
    }

    #[test]
    fn appending_out_of_order_is_refused() {
        let mut c = KvCache::new(None, 100);
        let t = step(0, 2);
        assert!(c.append(&t, &t, 1).is_err());
    }
}
