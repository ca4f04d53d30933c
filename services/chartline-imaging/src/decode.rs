//! Format detection and the `decode` entry point.

use crate::error::{ImageError, truncate_chars};
use crate::{dicom, raster};

/// Bounds on what [`decode`] accepts; checked before anything large is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted input, in bytes. Default 64 MiB.
    pub max_bytes: usize,
    /// Largest accepted `width * height` (per frame for DICOM). Default 100 000 000.
    pub max_pixels: u64,
    /// Largest accepted width or height. Default 30 000.
    pub max_side: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            max_pixels: 100_000_000,
            max_side: 30_000,
        }
    }
}

impl Limits {
    /// Checks declared dimensions against the limits.
    pub(crate) fn check_dimensions(&self, width: u32, height: u32) -> Result<(), ImageError> {
        let max_side = u64::from(self.max_side);
        if u64::from(width) > max_side {
            return Err(ImageError::TooLarge {
                what: "width",
                actual: width.into(),
                limit: max_side,
            });
        }
        if u64::from(height) > max_side {
            return Err(ImageError::TooLarge {
                what: "height",
                actual: height.into(),
                limit: max_side,
            });
        }
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(ImageError::TooLarge {
                what: "pixels",
                actual: pixels,
                limit: self.max_pixels,
            });
        }
        Ok(())
    }
}

/// What the decoded image was stored as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceFormat {
    /// A PNG file.
    Png,
    /// A JPEG (JFIF/EXIF) file.
    Jpeg,
    /// A DICOM Part 10 file; the image is its first frame.
    Dicom {
        /// The transfer syntax UID, e.g. `1.2.840.10008.1.2.4.90`.
        transfer_syntax: String,
        /// The Photometric Interpretation as stored, e.g. `MONOCHROME2`.
        photometric: String,
        /// The Number of Frames (1 when absent); only frame 0 is decoded.
        frames: u32,
    },
}

/// A decoded image: 8-bit RGB, row-major, no padding (`rgb.len() == width * height * 3`).
#[derive(Clone, PartialEq, Eq)]
pub struct DecodedImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved RGB8 samples, row-major.
    pub rgb: Vec<u8>,
    /// The format the bytes were in.
    pub format: SourceFormat,
}

// Pixel data stays out of debug output: it is patient content and it is large.
impl std::fmt::Debug for DecodedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodedImage")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("rgb", &format_args!("[{} bytes]", self.rgb.len()))
            .field("format", &self.format)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    Png,
    Jpeg,
    /// DICOM, with the offset of the `DICM` magic (128 with the preamble, 0 without).
    Dicom {
        magic_at: usize,
    },
}

impl Detected {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Detected::Png => "a PNG image",
            Detected::Jpeg => "a JPEG image",
            Detected::Dicom { .. } => "a DICOM file",
        }
    }
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

pub(crate) fn detect(bytes: &[u8]) -> Result<Detected, &'static str> {
    if bytes.starts_with(PNG_SIGNATURE) {
        return Ok(Detected::Png);
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(Detected::Jpeg);
    }
    if bytes.get(128..132) == Some(b"DICM") {
        return Ok(Detected::Dicom { magic_at: 128 });
    }
    if bytes.starts_with(b"DICM") {
        return Ok(Detected::Dicom { magic_at: 0 });
    }
    Err(describe_unknown(bytes))
}

/// Names what unsupported bytes look like, without echoing any of them.
fn describe_unknown(bytes: &[u8]) -> &'static str {
    const KNOWN: &[(&[u8], &str)] = &[
        (b"GIF87a", "a GIF image"),
        (b"GIF89a", "a GIF image"),
        (b"%PDF-", "a PDF document"),
        (b"II*\0", "a TIFF image"),
        (b"MM\0*", "a TIFF image"),
        (b"BM", "a BMP image"),
        (b"\0\0\0\x0cjP  \r\n\x87\n", "a JPEG 2000 (JP2) image"),
        (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
        (b"PK\x03\x04", "a ZIP archive"),
        (b"\x1f\x8b", "gzip-compressed data"),
        (b"<?xml", "an XML document"),
        (b"{", "JSON or other text"),
    ];
    if bytes.is_empty() {
        return "empty (0 bytes)";
    }
    if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        return "a WebP image";
    }
    if bytes.get(4..8) == Some(b"ftyp") {
        return "an ISO media file (HEIC/AVIF/MP4)";
    }
    for (magic, name) in KNOWN {
        if bytes.starts_with(magic) {
            return name;
        }
    }
    if bytes.len() >= 2 && bytes[..2] == [0xFF, 0xD8] {
        return "a truncated JPEG (no marker after SOI)";
    }
    let head = &bytes[..bytes.len().min(512)];
    let texty = head
        .iter()
        .all(|&b| b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7F).contains(&b) || b >= 0x80);
    if std::str::from_utf8(head).is_ok() && texty {
        "text"
    } else {
        "unrecognised binary data (no PNG, JPEG or DICOM signature)"
    }
}

/// The formats a declared content type allows; `None` means any (absent or
/// `application/octet-stream`).
fn declared(content_type: &str) -> Result<Option<Detected>, ()> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "image/png" => Ok(Some(Detected::Png)),
        "image/jpeg" | "image/jpg" => Ok(Some(Detected::Jpeg)),
        "application/dicom" => Ok(Some(Detected::Dicom { magic_at: 0 })),
        "application/octet-stream" | "" => Ok(None),
        _ => Err(()),
    }
}

/// Decodes a PNG, JPEG or DICOM Part 10 file to 8-bit RGB.
///
/// The format comes from the magic bytes (PNG signature, JPEG SOI, `DICM` at offset 128,
/// or at offset 0 for a file without preamble). When `content_type` is given it must be
/// `image/png`, `image/jpeg`, `application/dicom` (parameters ignored, case-insensitive)
/// and agree with the bytes; `application/octet-stream` is treated as absent.
///
/// Conversion to RGB follows Pillow's `Image.convert("RGB")` for PNG and JPEG, so that the
/// result matches what a Hugging Face processor sees from `PIL.Image.open(...)`: grey is
/// replicated, alpha is dropped (not composited), 16-bit RGB(A) and grey+alpha keep the
/// high byte, and 16-bit grey is *clipped* to 255 (Pillow's `I;16` to `RGB`). DICOM is
/// rendered as described in the crate documentation.
///
/// # Errors
/// [`ImageError::TooLarge`] for input or declared dimensions over `limits` (checked before
/// decoding), [`ImageError::UnsupportedFormat`] for anything else or a content-type
/// mismatch, [`ImageError::Corrupt`] for undecodable data and
/// [`ImageError::UnsupportedDicom`] for DICOM this crate does not render.
pub fn decode(
    bytes: &[u8],
    content_type: Option<&str>,
    limits: &Limits,
) -> Result<DecodedImage, ImageError> {
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooLarge {
            what: "input bytes",
            actual: bytes.len() as u64,
            limit: limits.max_bytes as u64,
        });
    }
    let shown_type = content_type.map(|ct| truncate_chars(ct, 100));
    let detected = detect(bytes).map_err(|found| ImageError::UnsupportedFormat {
        content_type: shown_type.clone(),
        found: found.to_owned(),
    })?;
    if let Some(ct) = content_type {
        let allowed = declared(ct).map_err(|()| ImageError::UnsupportedFormat {
            content_type: shown_type.clone(),
            found: detected.name().to_owned(),
        })?;
        if let Some(allowed) = allowed {
            let same = std::mem::discriminant(&allowed) == std::mem::discriminant(&detected);
            if !same {
                return Err(ImageError::UnsupportedFormat {
                    content_type: shown_type,
                    found: detected.name().to_owned(),
                });
            }
        }
    }
    match detected {
        Detected::Png => raster::decode(bytes, raster::Kind::Png, limits),
        Detected::Jpeg => raster::decode(bytes, raster::Kind::Jpeg, limits),
        Detected::Dicom { magic_at } => dicom::decode(&bytes[magic_at..], limits),
    }
}
