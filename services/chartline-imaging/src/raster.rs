//! PNG through the `png` crate and JPEG through `jpeg-decoder`, converted to RGB8 the way
//! Pillow does. (The `image` crate would add only a wrapper around these two plus a
//! mandatory colour-management dependency, `moxcms`, that dominated this crate's build.)
//!
//! JPEG decoders legitimately differ by a level here and there (IDCT precision, chroma
//! upsampling); `jpeg-decoder` comes closer to Pillow's libjpeg-turbo on the fixture
//! fundus photograph than `zune-jpeg` (the `image` crate's): 5% vs 8% of preprocessed
//! samples off by one level, at most two.

use std::io::Cursor;

use crate::decode::{DecodedImage, Limits, SourceFormat};
use crate::error::{ImageError, describe};

#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Png,
    Jpeg,
}

/// Width and height from a PNG's IHDR chunk, read before any decoder runs.
fn png_header_dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    // signature (8) + chunk length (4) + "IHDR" (4) + width (4) + height (4)
    let header = bytes
        .get(8..24)
        .ok_or_else(|| ImageError::corrupt("PNG", "file ends inside the IHDR header"))?;
    if &header[4..8] != b"IHDR" {
        return Err(ImageError::corrupt("PNG", "first chunk is not IHDR"));
    }
    let width = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    let height = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
    Ok((width, height))
}

/// The decoder's allocation budget: the largest image the pixel limit admits at the widest
/// sample layout PNG has (16-bit RGBA, 8 bytes per pixel), plus room for its buffers.
fn alloc_budget(limits: &Limits) -> u64 {
    limits
        .max_pixels
        .saturating_mul(8)
        .saturating_add(16 * 1024 * 1024)
}

pub(crate) fn decode(
    bytes: &[u8],
    kind: Kind,
    limits: &Limits,
) -> Result<DecodedImage, ImageError> {
    match kind {
        Kind::Png => decode_png(bytes, limits),
        Kind::Jpeg => decode_jpeg(bytes, limits),
    }
}

fn decode_jpeg(bytes: &[u8], limits: &Limits) -> Result<DecodedImage, ImageError> {
    let corrupt = |e: jpeg_decoder::Error| match e {
        jpeg_decoder::Error::Unsupported(feature) => ImageError::UnsupportedFormat {
            content_type: None,
            found: format!("a JPEG using an unsupported feature ({feature:?})"),
        },
        other => ImageError::corrupt("JPEG", describe(&other)),
    };
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.read_info().map_err(corrupt)?;
    let info = decoder
        .info()
        .ok_or_else(|| ImageError::corrupt("JPEG", "no frame header (SOF) before the scan"))?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    limits.check_dimensions(width, height)?;
    if width == 0 || height == 0 {
        return Err(ImageError::corrupt(
            "JPEG",
            "image has zero width or height",
        ));
    }
    let budget = usize::try_from(alloc_budget(limits)).unwrap_or(usize::MAX);
    decoder.set_max_decoding_buffer_size(budget);
    let pixels = decoder.decode().map_err(corrupt)?;
    let n = width as usize * height as usize;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        jpeg_decoder::PixelFormat::CMYK32 => pixels.chunks_exact(4).flat_map(cmyk_to_rgb).collect(),
        jpeg_decoder::PixelFormat::L16 => {
            return Err(ImageError::UnsupportedFormat {
                content_type: None,
                found: "a 12- or 16-bit JPEG (Pillow cannot open these either)".to_owned(),
            });
        }
    };
    if rgb.len() != n * 3 {
        return Err(ImageError::corrupt(
            "JPEG",
            format!(
                "decoder returned {} samples for a {width}x{height} image",
                rgb.len()
            ),
        ));
    }
    Ok(DecodedImage {
        width,
        height,
        rgb,
        format: SourceFormat::Jpeg,
    })
}

/// Pillow's `CMYK -> RGB` (`cmyk2rgb`) applied to Adobe-style inverted CMYK as stored in
/// almost every CMYK JPEG (Pillow reads those with the `CMYK;I` raw mode): with true
/// `c = 255 - stored_c` and `nk = stored_k`, `r = nk - c * nk / 255` (rounded as
/// Pillow's `MULDIV255`).
fn cmyk_to_rgb(px: &[u8]) -> [u8; 3] {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let nk = u32::from(px[3]);
    let chan = |stored: u8| (nk - muldiv255(255 - u32::from(stored), nk)) as u8;
    [chan(px[0]), chan(px[1]), chan(px[2])]
}

fn decode_png(bytes: &[u8], limits: &Limits) -> Result<DecodedImage, ImageError> {
    let (width, height) = png_header_dimensions(bytes)?;
    limits.check_dimensions(width, height)?;
    if width == 0 || height == 0 {
        return Err(ImageError::corrupt("PNG", "image has zero width or height"));
    }
    let budget = alloc_budget(limits);
    let map_err = |e: png::DecodingError| match e {
        png::DecodingError::LimitsExceeded => ImageError::TooLarge {
            what: "decoded size in bytes",
            actual: 0,
            limit: budget,
        },
        other => ImageError::corrupt("PNG", describe(&other)),
    };
    let png_limits = png::Limits {
        bytes: usize::try_from(budget).unwrap_or(usize::MAX),
    };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), png_limits);
    // Palette to RGB(A), 1/2/4-bit grey to 8-bit (scaled, as Pillow's `L;1`..`L;4`
    // unpackers do), tRNS to an alpha channel that is dropped below. 16-bit stays 16-bit.
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(map_err)?;
    let size = reader.output_buffer_size().ok_or(ImageError::TooLarge {
        what: "decoded size in bytes",
        actual: u64::MAX,
        limit: budget,
    })?;
    if size as u64 > budget {
        return Err(ImageError::TooLarge {
            what: "decoded size in bytes",
            actual: size as u64,
            limit: budget,
        });
    }
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(map_err)?;
    buf.truncate(frame.buffer_size());
    let grey16 = reader.info().color_type == png::ColorType::Grayscale;
    let (color, depth) = reader.output_color_type();
    let n = width as usize * height as usize;
    let rgb = to_rgb8_like_pillow(&buf, color, depth, grey16, n).ok_or_else(|| {
        ImageError::corrupt(
            "PNG",
            format!(
                "decoder returned {} bytes for a {width}x{height} {color:?} image",
                buf.len()
            ),
        )
    })?;
    Ok(DecodedImage {
        width,
        height,
        rgb,
        format: SourceFormat::Png,
    })
}

/// Pillow's `convert("RGB")` of what `Image.open` yields for the same PNG.
///
/// * 8-bit grey (with or without alpha): replicated; alpha dropped.
/// * 8-bit RGBA: alpha dropped (Pillow does not composite).
/// * 16-bit RGB(A) and grey+alpha: Pillow unpacks these with `;16B` raw modes, which keep
///   the high byte.
/// * 16-bit grey: Pillow opens it as `I;16` and its `I;16 -> RGB` conversion clips every
///   value above 255 to 255 (it does not scale). This is what a Hugging Face processor sees;
///   a 16-bit grey PNG meant for display should be windowed to 8 bits before it is sent.
///   A 16-bit grey PNG with a `tRNS` chunk (`grey16` true, decoded with alpha) is still
///   clipped, as Pillow does.
fn to_rgb8_like_pillow(
    buf: &[u8],
    color: png::ColorType,
    depth: png::BitDepth,
    grey16: bool,
    pixels: usize,
) -> Option<Vec<u8>> {
    use png::ColorType as C;
    let channels = match color {
        C::Grayscale => 1,
        C::GrayscaleAlpha => 2,
        C::Rgb => 3,
        C::Rgba => 4,
        C::Indexed => return None,
    };
    let bytes_per_sample = match depth {
        png::BitDepth::Eight => 1,
        png::BitDepth::Sixteen => 2,
        _ => return None,
    };
    let stride = channels * bytes_per_sample;
    if buf.len() != pixels * stride {
        return None;
    }
    let mut out = Vec::with_capacity(pixels * 3);
    for px in buf.chunks_exact(stride) {
        // Big-endian samples: byte 0 of each is the high byte.
        let sample = |i: usize| px[i * bytes_per_sample];
        match (channels, bytes_per_sample) {
            (1 | 2, 1) => out.extend_from_slice(&[px[0]; 3]),
            (3 | 4, 1) => out.extend_from_slice(&px[..3]),
            (1 | 2, _) if grey16 => {
                let v = if px[0] == 0 { px[1] } else { u8::MAX };
                out.extend_from_slice(&[v; 3]);
            }
            (1 | 2, _) => out.extend_from_slice(&[sample(0); 3]),
            _ => out.extend_from_slice(&[sample(0), sample(1), sample(2)]),
        }
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn encode_png(width: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, 1);
        encoder.set_color(color);
        encoder.set_depth(depth);
        let mut writer = encoder.write_header().expect("header");
        writer.write_image_data(data).expect("data");
        writer.finish().expect("finish");
        out
    }

    #[test]
    fn sixteen_bit_grey_png_is_clipped_like_pillow_i16_to_rgb() {
        // Big-endian samples 127, 256, 65535.
        let png = encode_png(
            3,
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
            &[0, 127, 1, 0, 255, 255],
        );
        let img = decode_png(&png, &Limits::default()).expect("decodes");
        assert_eq!(img.rgb, vec![127, 127, 127, 255, 255, 255, 255, 255, 255]);
    }

    #[test]
    fn sixteen_bit_rgb_png_keeps_the_high_byte_like_pillow() {
        let png = encode_png(
            1,
            png::ColorType::Rgb,
            png::BitDepth::Sixteen,
            &[0x12, 0xFF, 0xAB, 0x01, 0x00, 0x80],
        );
        let img = decode_png(&png, &Limits::default()).expect("decodes");
        assert_eq!(img.rgb, vec![0x12, 0xAB, 0x00]);
    }

    #[test]
    fn alpha_is_dropped_not_composited() {
        let png = encode_png(
            1,
            png::ColorType::Rgba,
            png::BitDepth::Eight,
            &[10, 20, 30, 0],
        );
        let img = decode_png(&png, &Limits::default()).expect("decodes");
        assert_eq!(img.rgb, vec![10, 20, 30]);
    }

    #[test]
    fn adobe_cmyk_converts_like_pillow() {
        // Stored (inverted) CMYK 255,255,255,255 is white; k stored 0 is black.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 0, 255, 0]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[255, 0, 128, 255]), [255, 0, 128]);
    }
}
