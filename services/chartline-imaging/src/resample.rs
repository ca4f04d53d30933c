//! Pillow's `Image.resize` for 8-bit RGB, reproduced bit for bit.
//!
//! Pillow (`src/libImaging/Resample.c`) resizes with a separable convolution: a
//! horizontal pass, then a vertical pass, each rounding and clipping to `u8`. When
//! downscaling, the filter's support is stretched by the scale factor (antialiasing). The
//! weights of each output pixel are normalised to sum to 1 and converted to fixed point
//! with 22 fractional bits; every sum starts at one half (rounding) and is shifted back.
//! Every step below mirrors that code, including C's truncating `(int)` casts, so the
//! output equals Pillow's exactly.

/// The Pillow resampling filters (numbered as `PIL.Image.Resampling`), except NEAREST,
/// which Pillow implements without convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `LANCZOS` (1): windowed sinc, support 3.
    Lanczos,
    /// `BILINEAR` (2): triangle, support 1.
    Bilinear,
    /// `BICUBIC` (3): Keys cubic with a = -0.5, support 2.
    Bicubic,
    /// `BOX` (4): support 0.5.
    Box,
    /// `HAMMING` (5): Hamming-windowed sinc, support 1.
    Hamming,
}

impl Filter {
    /// The filter for a Pillow resampling constant; `None` for NEAREST (0) and unknown values.
    pub fn from_pil(value: i64) -> Option<Self> {
        match value {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point weights of one axis: output pixel `i` reads `count[i]` inputs from
/// `first[i]`, weighted by `weights[i * ksize..]`.
struct Coefficients {
    ksize: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the full box
/// `[0, in_size)`.
fn coefficients(in_size: u32, out_size: u32, filter: Filter) -> Coefficients {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let out = out_size as usize;
    let mut first = Vec::with_capacity(out);
    let mut count = Vec::with_capacity(out);
    let mut weights = vec![0i32; out * ksize];
    let mut k = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out {
        let center = (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero; negative values are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let n = (xmax - xmin).max(0) as usize;
        let xmin = xmin as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(n) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        first.push(xmin);
        count.push(n);
    }
    Coefficients {
        ksize,
        first,
        count,
        weights,
    }
}

fn clip8(acc: i64) -> u8 {
    let v = acc >> PRECISION_BITS;
    v.clamp(0, 255) as u8
}

/// Resizes interleaved RGB8 like Pillow's `Image.resize((out_w, out_h), filter)`.
///
/// # Panics
/// If `src.len() != width * height * 3` or any size is zero.
pub fn resize_rgb8(
    src: &[u8],
    width: u32,
    height: u32,
    out_w: u32,
    out_h: u32,
    filter: Filter,
) -> Vec<u8> {
    assert!(
        width > 0 && height > 0 && out_w > 0 && out_h > 0,
        "resize_rgb8: sizes must be non-zero ({width}x{height} -> {out_w}x{out_h})"
    );
    assert_eq!(
        src.len(),
        width as usize * height as usize * 3,
        "resize_rgb8: src must hold width * height RGB pixels"
    );
    if (width, height) == (out_w, out_h) {
        return src.to_vec();
    }
    let half = 1i64 << (PRECISION_BITS - 1);
    let vertical = coefficients(height, out_h, filter);
    // Only the source rows the vertical pass reads go through the horizontal pass.
    let (row_first, row_last) = if height != out_h {
        let last = out_h as usize - 1;
        (
            vertical.first[0],
            vertical.first[last] + vertical.count[last],
        )
    } else {
        (0, height as usize)
    };

    let (mid, mid_w): (std::borrow::Cow<'_, [u8]>, usize) = if width != out_w {
        let h = coefficients(width, out_w, filter);
        let (in_w, ow) = (width as usize, out_w as usize);
        let mut mid = vec![0u8; (row_last - row_first) * ow * 3];
        for (y, out_row) in mid.chunks_exact_mut(ow * 3).enumerate() {
            let in_row = &src[(row_first + y) * in_w * 3..(row_first + y + 1) * in_w * 3];
            for xx in 0..ow {
                let k = &h.weights[xx * h.ksize..xx * h.ksize + h.count[xx]];
                let base = h.first[xx] * 3;
                let mut acc = [half; 3];
                for (x, &w) in k.iter().enumerate() {
                    let p = base + x * 3;
                    let w = i64::from(w);
                    acc[0] += i64::from(in_row[p]) * w;
                    acc[1] += i64::from(in_row[p + 1]) * w;
                    acc[2] += i64::from(in_row[p + 2]) * w;
                }
                out_row[xx * 3] = clip8(acc[0]);
                out_row[xx * 3 + 1] = clip8(acc[1]);
                out_row[xx * 3 + 2] = clip8(acc[2]);
            }
        }
        (mid.into(), ow)
    } else {
        let rows = &src[row_first * width as usize * 3..row_last * width as usize * 3];
        (rows.into(), width as usize)
    };

    if height == out_h {
        return mid.into_owned();
    }
    let stride = mid_w * 3;
    let mut out = vec![0u8; out_h as usize * stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let k = &vertical.weights[yy * vertical.ksize..yy * vertical.ksize + vertical.count[yy]];
        let first = vertical.first[yy] - row_first;
        for (i, o) in out_row.iter_mut().enumerate() {
            let mut acc = half;
            for (y, &w) in k.iter().enumerate() {
                acc += i64::from(mid[(first + y) * stride + i]) * i64::from(w);
            }
            *o = clip8(acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_every_output_pixel_sum_to_one_in_fixed_point() {
        for filter in [
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Lanczos,
            Filter::Box,
            Filter::Hamming,
        ] {
            for (input, output) in [(1024, 896), (1024, 448), (300, 896), (7, 3)] {
                let c = coefficients(input, output, filter);
                for i in 0..output as usize {
                    let sum: i64 = c.weights[i * c.ksize..i * c.ksize + c.count[i]]
                        .iter()
                        .map(|&w| i64::from(w))
                        .sum();
                    let one = 1i64 << PRECISION_BITS;
                    assert!(
                        (sum - one).abs() <= c.ksize as i64,
                        "{filter:?} {input}->{output} pixel {i}: {sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_at_any_size() {
        let src = vec![77u8; 13 * 9 * 3];
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            let out = resize_rgb8(&src, 13, 9, 32, 5, filter);
            assert!(
                out.iter().all(|&v| v == 77),
                "{filter:?} changed a flat image"
            );
        }
    }

    #[test]
    fn halving_with_bilinear_uses_the_stretched_triangle() {
        // 4 -> 2: scale 2, support 2. Output 0 (centre 1.0) reads inputs 0..3 with
        // triangle weights 0.75, 0.75, 0.25 (normalised by 1.75); output 1 (centre 3.0)
        // reads inputs 1..4 with 0.25, 0.75, 0.75.
        // 0*3/7 + 100*3/7 + 200*1/7 = 71.4; 100*1/7 + 200*3/7 + 255*3/7 = 209.3.
        let src: Vec<u8> = [0u8, 100, 200, 255]
            .iter()
            .flat_map(|&v| [v, v, v])
            .collect();
        let out = resize_rgb8(&src, 4, 1, 2, 1, Filter::Bilinear);
        assert_eq!(out, vec![71, 71, 71, 209, 209, 209]);
    }
}
