//! A pre-parse walk over a DICOM file's element headers.
//!
//! The DICOM parser allocates (and zeroes) each element's declared length before reading
//! it, so a few hundred bytes declaring a 4 GiB element would cost 4 GiB of memory. The
//! input is already in memory, so any declared length beyond the bytes that remain is a
//! lie; this walk finds one before the parser allocates for it. It also reads the transfer
//! syntax, so that unsupported encodings are refused before parsing.
//!
//! The walk is conservative: where it cannot follow the structure it stops and leaves
//! the verdict to the parser. Its only errors are a declared length past the end of the
//! input and an element header cut off by the end of the input.

use crate::error::ImageError;

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);
const TRANSFER_SYNTAX: (u16, u16) = (0x0002, 0x0010);

pub(crate) const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub(crate) const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
pub(crate) const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

/// Walks `data` (starting at the `DICM` magic) and returns the transfer syntax UID from
/// the file meta group, if present.
pub(crate) fn check(data: &[u8]) -> Result<Option<String>, ImageError> {
    let mut pos = 4; // "DICM"
    let mut ts: Option<String> = None;
    let mut implicit = false;
    let mut in_meta = true;
    let mut in_pixel_sequence = false;
    while pos < data.len() {
        let Some(tag) = read_tag(data, pos) else {
            return Err(truncated(pos));
        };
        if in_meta && tag.0 != 0x0002 {
            in_meta = false;
            match ts.as_deref() {
                Some(EXPLICIT_VR_BE) | Some(DEFLATED_EXPLICIT_VR_LE) => return Ok(ts),
                Some(IMPLICIT_VR_LE) => implicit = true,
                _ => {}
            }
        }
        let header_start = pos;
        pos += 4;
        if tag.0 == 0xFFFE {
            let len = read_u32(data, pos).ok_or_else(|| truncated(header_start))?;
            pos += 4;
            match tag {
                ITEM if len != UNDEFINED && in_pixel_sequence => {
                    pos = skip(data, pos, len, tag)?;
                }
                ITEM => {
                    if len != UNDEFINED {
                        ensure_fits(data, pos, len, tag)?;
                    }
                }
                SEQUENCE_END => in_pixel_sequence = false,
                ITEM_END => {}
                _ => return Ok(ts),
            }
            continue;
        }
        let (vr, len) = if implicit && !in_meta {
            let len = read_u32(data, pos).ok_or_else(|| truncated(header_start))?;
            pos += 4;
            (None, len)
        } else {
            let vr = data
                .get(pos..pos + 2)
                .ok_or_else(|| truncated(header_start))?;
            if !vr.iter().all(u8::is_ascii_uppercase) {
                return Ok(ts);
            }
            let vr = [vr[0], vr[1]];
            pos += 2;
            let long = matches!(
                &vr,
                b"OB"
                    | b"OD"
                    | b"OF"
                    | b"OL"
                    | b"OV"
                    | b"OW"
                    | b"SQ"
                    | b"SV"
                    | b"UC"
                    | b"UN"
                    | b"UR"
                    | b"UT"
                    | b"UV"
            );
            let len = if long {
                let len = read_u32(data, pos + 2).ok_or_else(|| truncated(header_start))?;
                pos += 6;
                len
            } else {
                let len = read_u16(data, pos).ok_or_else(|| truncated(header_start))?;
                pos += 2;
                u32::from(len)
            };
            (Some(vr), len)
        };
        if len == UNDEFINED {
            // A sequence, or encapsulated pixel data whose items are opaque fragments.
            if tag == PIXEL_DATA {
                in_pixel_sequence = true;
            }
            continue;
        }
        ensure_fits(data, pos, len, tag)?;
        let is_sequence = match vr {
            Some(vr) => &vr == b"SQ",
            // Implicit VR: a defined-length sequence starts with an item tag.
            None => len >= 8 && read_tag(data, pos) == Some(ITEM),
        };
        if is_sequence {
            continue;
        }
        if tag == TRANSFER_SYNTAX {
            let raw = &data[pos..pos + len as usize];
            let uid = String::from_utf8_lossy(raw)
                .trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_owned();
            ts = Some(uid);
        }
        pos = skip(data, pos, len, tag)?;
    }
    Ok(ts)
}

fn read_tag(data: &[u8], pos: usize) -> Option<(u16, u16)> {
    Some((read_u16(data, pos)?, read_u16(data, pos + 2)?))
}

fn read_u16(data: &[u8], pos: usize) -> Option<u16> {
    let b = data.get(pos..pos.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn read_u32(data: &[u8], pos: usize) -> Option<u32> {
    let b = data.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn ensure_fits(data: &[u8], pos: usize, len: u32, tag: (u16, u16)) -> Result<(), ImageError> {
    let remaining = data.len().saturating_sub(pos);
    if len as usize > remaining {
        return Err(ImageError::corrupt(
            "DICOM",
            format!(
                "element ({:04X},{:04X}) declares {len} bytes but only {remaining} remain \
                 (truncated file or corrupt length)",
                tag.0, tag.1
            ),
        ));
    }
    Ok(())
}

fn skip(data: &[u8], pos: usize, len: u32, tag: (u16, u16)) -> Result<usize, ImageError> {
    ensure_fits(data, pos, len, tag)?;
    Ok(pos + len as usize)
}

fn truncated(pos: usize) -> ImageError {
    ImageError::corrupt(
        "DICOM",
        format!("file ends inside an element header at byte {pos} after the DICM magic"),
    )
}
