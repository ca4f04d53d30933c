//! Cheap header parsers for the compressed frames of encapsulated DICOM pixel data.
//!
//! The codecs allocate for the size a frame's own header declares (`jpeg-decoder`'s
//! default buffer bound is `usize::MAX`; `openjp2` sizes its tiles from the SIZ), and a
//! failed allocation aborts the process. These parsers read that size from the first bytes of the frame so that it can
//! be compared with Rows/Columns and the [`Limits`](crate::Limits) before any decoding.
//!
//! Every read is bounded by the bytes present: truncated or malformed input is an `Err`
//! with a message describing the structure (markers, boxes, offsets), never a panic, and
//! no message contains image data.

/// The size a compressed frame's header declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    /// Width in pixels.
    pub(crate) width: u32,
    /// Height in pixels.
    pub(crate) height: u32,
    /// Number of components (samples per pixel).
    pub(crate) components: u32,
}

/// What the first bytes of a frame say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// A JPEG interchange stream (ITU T.81): starts with SOI.
    Jpeg,
    /// A JPEG 2000 codestream (ITU T.800): starts with SOC and SIZ.
    J2k,
    /// A JP2 file (ITU T.800 Annex I): starts with the JPEG 2000 signature box.
    Jp2,
}

const SOI: [u8; 2] = [0xFF, 0xD8];
const SOC_SIZ: [u8; 4] = [0xFF, 0x4F, 0xFF, 0x51];
const JP2_SIGNATURE: [u8; 12] = [
    0x00, 0x00, 0x00, 0x0C, b'j', b'P', b' ', b' ', 0x0D, 0x0A, 0x87, 0x0A,
];

/// Recognises a frame by its first bytes, as the codecs do; `None` for anything else
/// (RLE, or data the codec will refuse on its own).
pub(crate) fn sniff(frame: &[u8]) -> Option<FrameKind> {
    if frame.starts_with(&JP2_SIGNATURE) {
        Some(FrameKind::Jp2)
    } else if frame.starts_with(&SOC_SIZ) {
        Some(FrameKind::J2k)
    } else if frame.starts_with(&SOI) {
        Some(FrameKind::Jpeg)
    } else {
        None
    }
}

fn be_u16(data: &[u8], at: usize) -> Option<u16> {
    let end = at.checked_add(2)?;
    let b = data.get(at..end)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn be_u32(data: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    let b = data.get(at..end)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be_u64(data: &[u8], at: usize) -> Option<u64> {
    let end = at.checked_add(8)?;
    let b = data.get(at..end)?;
    Some(u64::from_be_bytes([
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
    ]))
}

/// The next marker at or after `pos`, and the position just after it. Like
/// `jpeg-decoder`, skips bytes before a 0xFF, fill bytes (0xFF) and stuffed zeros.
fn next_jpeg_marker(data: &[u8], mut pos: usize) -> Option<(u8, usize)> {
    loop {
        pos = pos.checked_add(data.get(pos..)?.iter().position(|&b| b == 0xFF)?)?;
        let mut byte = 0xFF;
        while byte == 0xFF {
            pos = pos.checked_add(1)?;
            byte = *data.get(pos)?;
        }
        pos = pos.checked_add(1)?;
        if byte != 0x00 {
            return Some((byte, pos));
        }
    }
}

/// Reads the first frame header (SOF0-3, 5-7, 9-11, 13-15) of a JPEG stream: its
/// markers are scanned from SOI, segments skipped by their length, until a SOF; a scan
/// (SOS) or the end of the image before it is an error.
pub(crate) fn jpeg(data: &[u8]) -> Result<FrameHeader, String> {
    if !data.starts_with(&SOI) {
        return Err("JPEG frame does not start with an SOI marker".into());
    }
    let mut pos = SOI.len();
    loop {
        let Some((marker, after)) = next_jpeg_marker(data, pos) else {
            return Err("JPEG frame ends before its frame header (SOF)".into());
        };
        match marker {
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                // Lf(2) P(1) Y(2) X(2) Nf(1)
                let (Some(height), Some(width), Some(&components)) = (
                    be_u16(data, after.saturating_add(3)),
                    be_u16(data, after.saturating_add(5)),
                    data.get(after.saturating_add(7)),
                ) else {
                    return Err(format!(
                        "JPEG frame ends inside its frame header (SOF marker 0xFF{marker:02X})"
                    ));
                };
                return Ok(FrameHeader {
                    width: width.into(),
                    height: height.into(),
                    components: components.into(),
                });
            }
            0xDA => return Err("JPEG frame has a scan (SOS) before any frame header (SOF)".into()),
            0xD9 => return Err("JPEG frame ends (EOI) before any frame header (SOF)".into()),
            // No length: SOI, RSTn, TEM.
            0xD8 | 0xD0..=0xD7 | 0x01 => pos = after,
            _ => {
                let Some(length) = be_u16(data, after) else {
                    return Err(format!(
                        "JPEG frame ends inside the length of marker 0xFF{marker:02X}"
                    ));
                };
                if length < 2 {
                    return Err(format!(
                        "JPEG marker 0xFF{marker:02X} has an invalid length {length}"
                    ));
                }
                let next = after.saturating_add(length.into());
                if next > data.len() {
                    return Err(format!(
                        "JPEG marker 0xFF{marker:02X} segment of {length} bytes runs past the \
                         end of the frame"
                    ));
                }
                pos = next;
            }
        }
    }
}

/// Reads the SIZ marker segment of a JPEG 2000 codestream: the image area
/// (Xsiz - XOsiz by Ysiz - YOsiz) and Csiz.
pub(crate) fn j2k(data: &[u8]) -> Result<FrameHeader, String> {
    if !data.starts_with(&SOC_SIZ) {
        return Err("JPEG 2000 codestream does not start with SOC and SIZ markers".into());
    }
    // SOC(2) SIZ(2) Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4) XTsiz(4) YTsiz(4)
    // XTOsiz(4) YTOsiz(4) Csiz(2)
    let (Some(x), Some(y), Some(x0), Some(y0), Some(components)) = (
        be_u32(data, 8),
        be_u32(data, 12),
        be_u32(data, 16),
        be_u32(data, 20),
        be_u16(data, 40),
    ) else {
        return Err("JPEG 2000 codestream ends inside its SIZ header".into());
    };
    Ok(FrameHeader {
        width: x.saturating_sub(x0),
        height: y.saturating_sub(y0),
        components: components.into(),
    })
}

/// What a JP2 file declares: the image header box and its codestream's SIZ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Jp2Header {
    /// From `jp2h`/`ihdr`.
    pub(crate) image: FrameHeader,
    /// From the SIZ of the `jp2c` codestream.
    pub(crate) codestream: FrameHeader,
}

/// One box: its type, its contents, and where the next box starts.
struct Jp2Box<'a> {
    kind: [u8; 4],
    contents: &'a [u8],
    next: usize,
    /// The box declares more bytes than remain; `contents` is what remains.
    cut: bool,
}

/// The box at `pos` in `data` (`None` at the end). A box may declare a 64-bit length
/// (`LBox` 1, `XLBox` follows) or run to the end of `data` (`LBox` 0). A box that
/// declares more bytes than remain keeps what remains and is marked `cut`.
fn jp2_box(data: &[u8], pos: usize) -> Result<Option<Jp2Box<'_>>, String> {
    if pos >= data.len() {
        return Ok(None);
    }
    let (Some(lbox), Some(kind)) = (
        be_u32(data, pos),
        pos.checked_add(8)
            .and_then(|end| data.get(pos + 4..end))
            .and_then(|t| <[u8; 4]>::try_from(t).ok()),
    ) else {
        return Err(format!("JP2 box header at offset {pos} is cut off"));
    };
    let remaining = data.len() - pos;
    let (header, length) = match lbox {
        0 => (8, remaining),
        1 => {
            let Some(xlbox) = be_u64(data, pos.saturating_add(8)) else {
                return Err(format!(
                    "JP2 box header at offset {pos} is cut off in its extended length"
                ));
            };
            if xlbox < 16 {
                return Err(format!(
                    "JP2 box at offset {pos} has an invalid extended length {xlbox}"
                ));
            }
            (16, usize::try_from(xlbox).unwrap_or(usize::MAX))
        }
        2..=7 => {
            return Err(format!(
                "JP2 box at offset {pos} has an invalid length {lbox}"
            ));
        }
        n => (8, usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let cut = length > remaining;
    let end = pos + length.min(remaining);
    Ok(Some(Jp2Box {
        kind,
        contents: &data[pos + header..end],
        next: end,
        cut,
    }))
}

/// Walks a JP2 file's boxes to `jp2h` → `ihdr` (HEIGHT, WIDTH, NC) and to the SIZ of the
/// `jp2c` codestream that follows, as `openjp2` reads them: the header must come before
/// the codestream, and nothing after the codestream's start is read.
pub(crate) fn jp2(data: &[u8]) -> Result<Jp2Header, String> {
    if !data.starts_with(&JP2_SIGNATURE) {
        return Err("JP2 file does not start with the JPEG 2000 signature box".into());
    }
    let mut image = None;
    let mut pos = 0;
    while let Some(b) = jp2_box(data, pos)? {
        // The codestream box may be cut short (the decoder reads what is there); any
        // box before it must fit.
        if b.cut && &b.kind != b"jp2c" {
            return Err(format!(
                "JP2 box at offset {pos} declares more bytes than the frame holds"
            ));
        }
        match &b.kind {
            b"jp2h" if image.is_none() => {
                image = Some(jp2_image_header(b.contents)?);
            }
            b"jp2c" => {
                let Some(image) = image else {
                    return Err(
                        "JP2 codestream box (jp2c) comes before any header box (jp2h)".into(),
                    );
                };
                let codestream = j2k(b.contents)?;
                return Ok(Jp2Header { image, codestream });
            }
            _ => {}
        }
        pos = b.next;
    }
    Err("JP2 file has no codestream box (jp2c)".into())
}

/// The `ihdr` box inside the contents of a `jp2h` box.
fn jp2_image_header(jp2h: &[u8]) -> Result<FrameHeader, String> {
    let mut pos = 0;
    while let Some(b) = jp2_box(jp2h, pos)? {
        if b.cut {
            return Err(format!(
                "JP2 box at offset {pos} of the header box (jp2h) declares more bytes than \
                 the header box holds"
            ));
        }
        if &b.kind == b"ihdr" {
            // HEIGHT(4) WIDTH(4) NC(2) BPC(1) C(1) UnkC(1) IPR(1)
            let (Some(height), Some(width), Some(components)) = (
                be_u32(b.contents, 0),
                be_u32(b.contents, 4),
                be_u16(b.contents, 8),
            ) else {
                return Err("JP2 image header box (ihdr) is cut off".into());
            };
            return Ok(FrameHeader {
                width,
                height,
                components: components.into(),
            });
        }
        pos = b.next;
    }
    Err("JP2 header box (jp2h) has no image header box (ihdr)".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0xFF, marker];
        out.extend_from_slice(&u16::try_from(body.len() + 2).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn sof_body(height: u16, width: u16, components: u8) -> Vec<u8> {
        let mut body = vec![8];
        body.extend_from_slice(&height.to_be_bytes());
        body.extend_from_slice(&width.to_be_bytes());
        body.push(components);
        for id in 1..=components {
            body.extend_from_slice(&[id, 0x11, 0]);
        }
        body
    }

    /// SOI, an APP0 whose contents contain a SOF-like byte pair, a DQT, then `sof`.
    fn jpeg_with(sof: u8, height: u16, width: u16, components: u8) -> Vec<u8> {
        let mut out = SOI.to_vec();
        out.extend(segment(0xE0, b"JFIF\0\xFF\xC0\xFF\xFF\x01\x02"));
        out.extend(segment(0xDB, &[0; 65]));
        out.extend(segment(sof, &sof_body(height, width, components)));
        out.extend(segment(0xDA, &[1, 1, 0, 0, 63, 0]));
        out.extend_from_slice(&[0x12, 0x34, 0xFF, 0xD9]);
        out
    }

    fn header(width: u32, height: u32, components: u32) -> FrameHeader {
        FrameHeader {
            width,
            height,
            components,
        }
    }

    #[test]
    fn jpeg_sof_is_found_behind_segments_for_every_frame_type() {
        for sof in [
            0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
        ] {
            let data = jpeg_with(sof, 0xFFFF, 0xFFFF, 3);
            assert_eq!(sniff(&data), Some(FrameKind::Jpeg));
            assert_eq!(jpeg(&data), Ok(header(65535, 65535, 3)), "SOF 0x{sof:02X}");
        }
        // DHT (C4), JPG (C8) and DAC (CC) are not frame headers: skipped by length.
        let mut data = SOI.to_vec();
        for marker in [0xC4, 0xC8, 0xCC] {
            data.extend(segment(marker, &sof_body(9, 9, 1)));
        }
        data.extend(segment(0xC0, &sof_body(20, 10, 1)));
        assert_eq!(jpeg(&data), Ok(header(10, 20, 1)));
    }

    #[test]
    fn jpeg_scan_skips_fill_bytes_stray_bytes_and_markers_without_length() {
        let mut data = SOI.to_vec();
        data.extend_from_slice(&[0xFF, 0xFF, 0xFF]); // fill bytes before a marker
        data.extend(segment(0xFE, b"comment"));
        data.extend_from_slice(&[0x00, 0x42, 0xFF, 0x00]); // stray bytes, a stuffed zero
        data.extend_from_slice(&[0xFF, 0xD0, 0xFF, 0x01]); // RST0, TEM
        data.extend(segment(0xC1, &sof_body(512, 256, 1)));
        assert_eq!(jpeg(&data), Ok(header(256, 512, 1)));
    }

    #[test]
    fn jpeg_without_a_frame_header_before_its_scan_is_an_error() {
        let mut data = SOI.to_vec();
        data.extend(segment(0xDA, &[1, 1, 0, 0, 63, 0]));
        data.extend(segment(0xC0, &sof_body(1, 1, 1)));
        assert!(jpeg(&data).unwrap_err().contains("SOS"));
        let eoi = [0xFF, 0xD8, 0xFF, 0xD9];
        assert!(jpeg(&eoi).unwrap_err().contains("EOI"));
        assert!(jpeg(&[0xFF, 0xD9]).unwrap_err().contains("SOI"));
    }

    #[test]
    fn jpeg_segment_lengths_are_checked() {
        for bad_length in [0u16, 1] {
            let mut data = SOI.to_vec();
            data.extend_from_slice(&[0xFF, 0xE1]);
            data.extend_from_slice(&bad_length.to_be_bytes());
            data.extend(segment(0xC0, &sof_body(1, 1, 1)));
            assert!(jpeg(&data).unwrap_err().contains("invalid length"));
        }
        let mut data = SOI.to_vec();
        data.extend_from_slice(&[0xFF, 0xE1, 0xFF, 0xFF, 0, 0]);
        assert!(jpeg(&data).unwrap_err().contains("past the end"));
    }

    #[test]
    fn every_truncation_of_a_jpeg_header_is_an_error_not_a_panic() {
        let data = jpeg_with(0xC0, 300, 200, 3);
        let sof_at = data
            .windows(2)
            .rposition(|w| w == [0xFF, 0xC0])
            .unwrap_or(0);
        // The header is complete once Nf (8 bytes after the marker) is present.
        let complete = sof_at + 2 + 8;
        for cut in 0..data.len() {
            let result = jpeg(&data[..cut]);
            if cut < complete {
                assert!(result.is_err(), "cut at {cut}: {result:?}");
            } else {
                assert_eq!(result, Ok(header(200, 300, 3)), "cut at {cut}");
            }
        }
    }

    fn siz(width: u32, height: u32, x0: u32, y0: u32, components: u16) -> Vec<u8> {
        let mut out = SOC_SIZ.to_vec();
        let lsiz = 38 + 3 * components;
        out.extend_from_slice(&lsiz.to_be_bytes());
        out.extend_from_slice(&[0, 0]); // Rsiz
        for v in [width, height, x0, y0, width, height, 0, 0] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&components.to_be_bytes());
        for _ in 0..components {
            out.extend_from_slice(&[7, 1, 1]);
        }
        out.extend_from_slice(&[0xFF, 0x52]); // COD follows
        out
    }

    #[test]
    fn j2k_siz_gives_the_image_area_and_components() {
        let data = siz(1841, 1955, 0, 0, 1);
        assert_eq!(sniff(&data), Some(FrameKind::J2k));
        assert_eq!(j2k(&data), Ok(header(1841, 1955, 1)));
        assert_eq!(j2k(&siz(110, 220, 10, 20, 3)), Ok(header(100, 200, 3)));
        // An origin past the extent is an empty area, not an underflow.
        assert_eq!(j2k(&siz(5, 5, 10, 10, 1)), Ok(header(0, 0, 1)));
        for cut in 0..42 {
            assert!(j2k(&data[..cut]).is_err(), "cut at {cut}");
        }
        assert!(j2k(&data[..42]).is_ok());
    }

    fn jp2_box_bytes(kind: &[u8; 4], contents: &[u8]) -> Vec<u8> {
        let mut out = u32::try_from(contents.len() + 8)
            .unwrap_or(0)
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(contents);
        out
    }

    fn ihdr(width: u32, height: u32, components: u16) -> Vec<u8> {
        let mut contents = height.to_be_bytes().to_vec();
        contents.extend_from_slice(&width.to_be_bytes());
        contents.extend_from_slice(&components.to_be_bytes());
        contents.extend_from_slice(&[7, 7, 0, 0]);
        jp2_box_bytes(b"ihdr", &contents)
    }

    /// Signature, `ftyp`, `jp2h` (`ihdr`, `colr`), then `jp2c` as given.
    fn jp2_with(ihdr_box: &[u8], jp2c: &[u8]) -> Vec<u8> {
        let mut out = JP2_SIGNATURE.to_vec();
        out.extend(jp2_box_bytes(b"ftyp", b"jp2 \0\0\0\0jp2 "));
        let mut jp2h = ihdr_box.to_vec();
        jp2h.extend(jp2_box_bytes(b"colr", &[1, 0, 0, 0, 0, 0, 17]));
        out.extend(jp2_box_bytes(b"jp2h", &jp2h));
        out.extend_from_slice(jp2c);
        out
    }

    #[test]
    fn jp2_reads_ihdr_and_the_codestream_siz() {
        let data = jp2_with(
            &ihdr(640, 480, 3),
            &jp2_box_bytes(b"jp2c", &siz(64, 48, 0, 0, 1)),
        );
        assert_eq!(sniff(&data), Some(FrameKind::Jp2));
        assert_eq!(
            jp2(&data),
            Ok(Jp2Header {
                image: header(640, 480, 3),
                codestream: header(64, 48, 1),
            })
        );
    }

    #[test]
    fn jp2_box_lengths_extended_and_to_the_end() {
        let codestream = siz(30, 40, 0, 0, 1);
        let expected = Ok(Jp2Header {
            image: header(30, 40, 1),
            codestream: header(30, 40, 1),
        });
        // LBox 0: the codestream box runs to the end.
        let mut to_end = vec![0, 0, 0, 0];
        to_end.extend_from_slice(b"jp2c");
        to_end.extend_from_slice(&codestream);
        assert_eq!(jp2(&jp2_with(&ihdr(30, 40, 1), &to_end)), expected);
        // LBox 1: XLBox gives the length.
        let mut extended = vec![0, 0, 0, 1];
        extended.extend_from_slice(b"jp2c");
        extended.extend_from_slice(&(16 + codestream.len() as u64).to_be_bytes());
        extended.extend_from_slice(&codestream);
        assert_eq!(jp2(&jp2_with(&ihdr(30, 40, 1), &extended)), expected);
        // A codestream box that claims more than is there keeps what is there.
        let mut huge = vec![0, 0, 0, 1];
        huge.extend_from_slice(b"jp2c");
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&codestream);
        assert_eq!(jp2(&jp2_with(&ihdr(30, 40, 1), &huge)), expected);
        // An extended-length ihdr inside jp2h.
        let mut ihdr_ext = vec![0, 0, 0, 1];
        ihdr_ext.extend_from_slice(b"ihdr");
        ihdr_ext.extend_from_slice(&30u64.to_be_bytes());
        ihdr_ext.extend_from_slice(&ihdr(30, 40, 1)[8..]);
        let stream = jp2_box_bytes(b"jp2c", &codestream);
        assert_eq!(jp2(&jp2_with(&ihdr_ext, &stream)), expected);
    }

    #[test]
    fn malformed_jp2_structures_are_errors() {
        let stream = jp2_box_bytes(b"jp2c", &siz(30, 40, 0, 0, 1));
        // LBox 2..=7 and XLBox below 16 are invalid.
        for lbox in 2u32..8 {
            let mut data = jp2_with(&ihdr(30, 40, 1), &[]);
            data.extend_from_slice(&lbox.to_be_bytes());
            data.extend_from_slice(b"jp2c");
            data.extend_from_slice(&siz(30, 40, 0, 0, 1));
            assert!(jp2(&data).unwrap_err().contains("invalid length"), "{lbox}");
        }
        let mut data = jp2_with(&ihdr(30, 40, 1), &[0, 0, 0, 1]);
        data.extend_from_slice(b"jp2c");
        data.extend_from_slice(&15u64.to_be_bytes());
        assert!(jp2(&data).unwrap_err().contains("extended length"));
        // The codestream before the header, no ihdr, no codestream.
        let mut early = JP2_SIGNATURE.to_vec();
        early.extend_from_slice(&stream);
        assert!(jp2(&early).unwrap_err().contains("before"));
        let mut no_ihdr = JP2_SIGNATURE.to_vec();
        no_ihdr.extend(jp2_box_bytes(
            b"jp2h",
            &jp2_box_bytes(b"colr", &[1, 0, 0, 0, 0, 0, 17]),
        ));
        no_ihdr.extend_from_slice(&stream);
        assert!(jp2(&no_ihdr).unwrap_err().contains("no image header"));
        assert!(
            jp2(&jp2_with(&ihdr(30, 40, 1), &[]))
                .unwrap_err()
                .contains("no codestream")
        );
        // A box before the codestream that claims more than the frame holds.
        let mut long = JP2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x7F, 0, 0, 0]);
        long.extend_from_slice(b"uuid");
        long.extend_from_slice(&[0; 8]);
        assert!(jp2(&long).unwrap_err().contains("more bytes"));
        // A codestream box without a codestream.
        let data = jp2_with(&ihdr(30, 40, 1), &jp2_box_bytes(b"jp2c", &[0; 50]));
        assert!(jp2(&data).unwrap_err().contains("SOC"));
    }

    #[test]
    fn every_truncation_of_a_jp2_header_is_an_error_not_a_panic() {
        let data = jp2_with(
            &ihdr(30, 40, 1),
            &jp2_box_bytes(b"jp2c", &siz(30, 40, 0, 0, 1)),
        );
        let jp2c_at = data
            .windows(4)
            .position(|w| w == b"jp2c")
            .unwrap_or(0)
            .saturating_sub(4);
        // Complete once the codestream's Csiz (42 bytes after the box header) is there.
        let complete = jp2c_at + 8 + 42;
        for cut in 0..data.len() {
            let result = jp2(&data[..cut]);
            if cut < complete {
                assert!(result.is_err(), "cut at {cut}: {result:?}");
            } else {
                assert!(result.is_ok(), "cut at {cut}: {result:?}");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_after_each_signature_never_panic() {
        // A small xorshift generator: deterministic, no dependency.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..3000 {
            let len = (next() % 96) as usize;
            let mut tail: Vec<u8> = (0..len).map(|_| (next() >> 24) as u8).collect();
            // Bias towards structure: sprinkle marker and box bytes.
            for b in tail.iter_mut() {
                match next() % 8 {
                    0 => *b = 0xFF,
                    1 => *b = 0,
                    _ => {}
                }
            }
            let prefix: &[u8] = match round % 3 {
                0 => &SOI,
                1 => &SOC_SIZ,
                _ => &JP2_SIGNATURE,
            };
            let mut data = prefix.to_vec();
            data.extend_from_slice(&tail);
            let _ = jpeg(&data);
            let _ = j2k(&data);
            let _ = jp2(&data);
        }
    }
}
