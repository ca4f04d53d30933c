//! Encapsulated DICOM frames whose own header (JPEG SOF, JP2 `ihdr`, JPEG 2000 SIZ)
//! disagrees with Rows/Columns or exceeds the limits are refused before the codec
//! allocates for them; consistent ones decode as before.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chartline_imaging::{DecodedImage, ImageError, Limits, decode, dicom_stored_values};

fn fixture(rel: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/images")
        .join(rel);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("fixture {} must be readable: {e}", path.display()))
}

const FUNDUS: &str = "fundus/skimage-retina.jpg";
const J2K: &str = "dicom/RG1_J2KI.dcm";

const JPEG_TRANSFER_SYNTAXES: [&str; 4] = [
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
];
const J2K_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";

/// One Explicit VR Little Endian element with a defined length.
fn element(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut value = value.to_vec();
    if value.len() % 2 == 1 {
        value.push(if vr == b"UI" || vr == b"OB" { 0 } else { b' ' });
    }
    let mut out = Vec::new();
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if matches!(vr, b"OB" | b"OW" | b"UN" | b"SQ" | b"UT") {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&value);
    out
}

fn us(group: u16, elem: u16, v: u16) -> Vec<u8> {
    element(group, elem, b"US", &v.to_le_bytes())
}

fn item(tag_elem: u16, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0xFE, 0xFF];
    out.extend_from_slice(&tag_elem.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// A minimal Part 10 file: 8-bit frames of `rows x columns x spp`, encapsulated in
/// `fragments` (each padded to an even length) after an empty Basic Offset Table.
fn dicom(ts: &str, rows: u16, columns: u16, spp: u16, fragments: &[&[u8]]) -> Vec<u8> {
    let mut meta = element(0x0002, 0x0001, b"OB", &[0, 1]);
    meta.extend(element(0x0002, 0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.7"));
    meta.extend(element(
        0x0002,
        0x0003,
        b"UI",
        b"1.2.826.0.1.3680043.2.1143.1",
    ));
    meta.extend(element(0x0002, 0x0010, b"UI", ts.as_bytes()));
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    out.extend(element(
        0x0002,
        0x0000,
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    ));
    out.extend(meta);
    out.extend(us(0x0028, 0x0002, spp));
    let photometric: &[u8] = if spp == 1 { b"MONOCHROME2" } else { b"RGB" };
    out.extend(element(0x0028, 0x0004, b"CS", photometric));
    if spp > 1 {
        out.extend(us(0x0028, 0x0006, 0));
    }
    out.extend(us(0x0028, 0x0010, rows));
    out.extend(us(0x0028, 0x0011, columns));
    out.extend(us(0x0028, 0x0100, 8));
    out.extend(us(0x0028, 0x0101, 8));
    out.extend(us(0x0028, 0x0102, 7));
    out.extend(us(0x0028, 0x0103, 0));
    out.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    out.extend_from_slice(&u32::MAX.to_le_bytes());
    out.extend(item(0xE000, &[]));
    for fragment in fragments {
        let mut fragment = fragment.to_vec();
        if fragment.len() % 2 == 1 {
            fragment.push(0);
        }
        out.extend(item(0xE000, &fragment));
    }
    out.extend(item(0xE0DD, &[]));
    out
}

fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0xFF, marker];
    out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The start of a JPEG whose SOF0 declares `width x height x components`, with an APP0,
/// a DQT, a scan header and a few bytes of entropy-coded data.
fn jpeg_claiming(width: u16, height: u16, components: u8) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    out.extend(segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"));
    out.extend(segment(0xDB, &[1; 65]));
    let mut sof = vec![8];
    sof.extend_from_slice(&height.to_be_bytes());
    sof.extend_from_slice(&width.to_be_bytes());
    sof.push(components);
    for id in 1..=components {
        sof.extend_from_slice(&[id, 0x11, 0]);
    }
    out.extend(segment(0xC0, &sof));
    out.extend(segment(0xDA, &[1, 1, 0, 0, 63, 0]));
    out.extend_from_slice(&[0x55; 32]);
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

fn jp2_box(kind: &[u8; 4], contents: &[u8]) -> Vec<u8> {
    let mut out = ((contents.len() + 8) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(contents);
    out
}

/// A JP2 file: signature, `ftyp`, `jp2h` (`ihdr` declaring `width x height`, greyscale
/// `colr`), then `codestream` in `jp2c`.
fn jp2_wrapping(width: u32, height: u32, components: u16, codestream: &[u8]) -> Vec<u8> {
    let mut out = jp2_box(b"jP  ", &[0x0D, 0x0A, 0x87, 0x0A]);
    out.extend(jp2_box(b"ftyp", b"jp2 \0\0\0\0jp2 "));
    let mut ihdr = height.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&components.to_be_bytes());
    ihdr.extend_from_slice(&[15, 7, 0, 0]); // 16-bit unsigned, wavelet, no IPR
    let mut jp2h = jp2_box(b"ihdr", &ihdr);
    jp2h.extend(jp2_box(b"colr", &[1, 0, 0, 0, 0, 0, 17]));
    out.extend(jp2_box(b"jp2h", &jp2h));
    out.extend(jp2_box(b"jp2c", codestream));
    out
}

/// The first 42 bytes of a JPEG 2000 codestream (SOC, SIZ through Csiz) declaring
/// `width x height`, one 8-bit component, then a few bytes.
fn j2k_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut out = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
    for v in [width, height, 0, 0, width, height, 0, 0] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&[0, 1, 7, 1, 1]);
    out.extend_from_slice(&[0xFF, 0x52, 0, 12, 0, 0, 0, 1, 0, 5, 4, 4, 0, 0]);
    out
}

/// Decodes with `decode` and `dicom_stored_values`; both must fail fast with the same
/// kind of error. Returns `decode`'s.
fn refused(bytes: &[u8], limits: &Limits) -> ImageError {
    let started = Instant::now();
    let err = match decode(bytes, Some("application/dicom"), limits) {
        Ok(img) => panic!("expected an error, got {img:?}"),
        Err(e) => e,
    };
    if *limits == Limits::default() {
        let stored = dicom_stored_values(bytes).expect_err("stored values are refused too");
        assert_eq!(stored.to_string(), err.to_string());
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused before decoding: {:?}",
        started.elapsed()
    );
    err
}

fn loose() -> Limits {
    Limits {
        max_side: u32::MAX,
        max_pixels: u64::MAX,
        ..Limits::default()
    }
}

#[test]
fn jpeg_sof_claiming_65535_square_is_too_large_under_every_jpeg_syntax() {
    let frame = jpeg_claiming(65535, 65535, 3);
    for ts in JPEG_TRANSFER_SYNTAXES {
        let bytes = dicom(ts, 128, 128, 3, &[&frame]);
        assert!(bytes.len() < 2048, "a small file: {} bytes", bytes.len());
        let err = refused(&bytes, &Limits::default());
        assert!(
            matches!(
                err,
                ImageError::TooLarge {
                    what: "width",
                    actual: 65535,
                    limit: 30_000
                }
            ),
            "{ts}: {err}"
        );
    }
}

#[test]
fn jpeg_sof_disagreeing_with_rows_and_columns_is_corrupt_even_within_limits() {
    let frame = jpeg_claiming(65535, 65535, 3);
    let bytes = dicom(JPEG_TRANSFER_SYNTAXES[0], 128, 128, 3, &[&frame]);
    let err = refused(&bytes, &loose());
    assert!(
        matches!(
            err,
            ImageError::Corrupt {
                format: "DICOM",
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("JPEG frame header (SOF) is 65535x65535 with 3 components")
            && msg.contains("Columns/Rows/SamplesPerPixel say 128x128 with 3"),
        "{msg}"
    );

    // Smaller than declared, transposed, or a different number of components.
    for (frame, expected) in [
        (jpeg_claiming(64, 64, 3), "64x64 with 3"),
        (jpeg_claiming(96, 128, 3), "96x128 with 3"),
        (jpeg_claiming(128, 128, 1), "128x128 with 1"),
    ] {
        let bytes = dicom(JPEG_TRANSFER_SYNTAXES[1], 96, 128, 3, &[&frame]);
        let err = refused(&bytes, &Limits::default());
        let msg = err.to_string();
        assert!(
            matches!(err, ImageError::Corrupt { .. }) && msg.contains(expected),
            "{expected}: {msg}"
        );
    }
}

#[test]
fn jpeg_header_split_across_fragments_is_still_checked() {
    let frame = jpeg_claiming(65535, 65535, 3);
    let (head, tail) = frame.split_at(10);
    let bytes = dicom(JPEG_TRANSFER_SYNTAXES[0], 128, 128, 3, &[head, tail]);
    let err = refused(&bytes, &Limits::default());
    assert!(
        matches!(err, ImageError::TooLarge { what: "width", .. }),
        "{err}"
    );
}

#[test]
fn truncated_jpeg_header_is_corrupt() {
    let frame = jpeg_claiming(128, 128, 3);
    let sof = frame.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    let bytes = dicom(JPEG_TRANSFER_SYNTAXES[0], 128, 128, 3, &[&frame[..sof + 6]]);
    let err = refused(&bytes, &Limits::default());
    assert!(
        matches!(err, ImageError::Corrupt { .. }) && err.to_string().contains("SOF"),
        "{err}"
    );
}

#[test]
fn real_jpeg_in_dicom_decodes_like_the_jpeg_file() {
    let jpeg = fixture(FUNDUS);
    let direct = decode(&jpeg, None, &Limits::default()).unwrap();
    assert_eq!((direct.width, direct.height), (1411, 1411));
    let bytes = dicom(JPEG_TRANSFER_SYNTAXES[0], 1411, 1411, 3, &[&jpeg]);
    let img: DecodedImage = decode(&bytes, None, &Limits::default()).unwrap();
    assert_eq!((img.width, img.height), (1411, 1411));
    assert!(
        img.rgb == direct.rgb,
        "the same decoder gives the same pixels"
    );
}

#[test]
fn jp2_ihdr_claiming_65535_square_is_too_large() {
    let frame = jp2_wrapping(65535, 65535, 1, &j2k_claiming(128, 128));
    let bytes = dicom(J2K_LOSSLESS, 128, 128, 1, &[&frame]);
    let err = refused(&bytes, &Limits::default());
    assert!(
        matches!(
            err,
            ImageError::TooLarge {
                what: "width",
                actual: 65535,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn jp2_ihdr_or_codestream_disagreeing_with_rows_and_columns_is_corrupt() {
    let frame = jp2_wrapping(1000, 1000, 1, &j2k_claiming(128, 128));
    let bytes = dicom(J2K_LOSSLESS, 128, 128, 1, &[&frame]);
    let err = refused(&bytes, &Limits::default());
    let msg = err.to_string();
    assert!(
        matches!(err, ImageError::Corrupt { .. })
            && msg.contains("JP2 image header (ihdr) is 1000x1000")
            && msg.contains("say 128x128"),
        "{msg}"
    );

    // The wrapper agrees, the codestream inside does not.
    let frame = jp2_wrapping(128, 128, 1, &j2k_claiming(20_000, 20_000));
    let bytes = dicom(J2K_LOSSLESS, 128, 128, 1, &[&frame]);
    let err = refused(&bytes, &Limits::default());
    assert!(
        matches!(err, ImageError::TooLarge { what: "pixels", .. }),
        "{err}"
    );
    let frame = jp2_wrapping(128, 128, 1, &j2k_claiming(256, 128));
    let bytes = dicom(J2K_LOSSLESS, 128, 128, 1, &[&frame]);
    let msg = refused(&bytes, &Limits::default()).to_string();
    assert!(msg.contains("JP2 codestream (SIZ) is 256x128"), "{msg}");

    // Cut inside the codestream's SIZ.
    let frame = jp2_wrapping(128, 128, 1, &j2k_claiming(128, 128)[..30]);
    let bytes = dicom(J2K_LOSSLESS, 128, 128, 1, &[&frame]);
    let msg = refused(&bytes, &Limits::default()).to_string();
    assert!(msg.contains("ends inside its SIZ"), "{msg}");
}

#[test]
fn raw_j2k_codestream_is_still_checked() {
    let bytes = dicom(J2K_LOSSLESS, 128, 128, 1, &[&j2k_claiming(65535, 65535)]);
    let err = refused(&bytes, &Limits::default());
    assert!(
        matches!(err, ImageError::TooLarge { what: "width", .. }),
        "{err}"
    );
    let bytes = dicom(J2K_LOSSLESS, 128, 128, 1, &[&j2k_claiming(64, 128)]);
    let msg = refused(&bytes, &Limits::default()).to_string();
    assert!(
        msg.contains("JPEG 2000 codestream (SIZ) is 64x128"),
        "{msg}"
    );
}

/// The fixture's JPEG 2000 codestream (the concatenation of its fragments, as the codec
/// reads it) and the fixture with those fragments replaced by one holding `wrap(codestream)`.
fn rewrap_fixture(bytes: &[u8], wrap: impl Fn(&[u8]) -> Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let first = bytes
        .windows(4)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])
        .expect("the fixture holds a raw codestream")
        - 8;
    let mut codestream = Vec::new();
    let mut at = first;
    while bytes[at..at + 4] == [0xFE, 0xFF, 0x00, 0xE0] {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        codestream.extend_from_slice(&bytes[at + 8..at + 8 + len]);
        at += 8 + len;
    }
    assert_eq!(
        bytes[at..at + 4],
        [0xFE, 0xFF, 0xDD, 0xE0],
        "the fragments end with the sequence delimiter"
    );
    let mut frame = wrap(&codestream);
    if frame.len() % 2 == 1 {
        frame.push(0);
    }
    let mut out = bytes[..first].to_vec();
    out.extend(item(0xE000, &frame));
    out.extend_from_slice(&bytes[at..]);
    (codestream, out)
}

#[test]
fn fixture_codestream_wrapped_in_jp2_decodes_like_the_raw_one() {
    let original = fixture(J2K);
    let (codestream, wrapped) = rewrap_fixture(&original, |c| jp2_wrapping(1841, 1955, 1, c));
    assert!(codestream.len() > 65536, "the codestream spans fragments");
    let raw = decode(&original, None, &Limits::default()).unwrap();
    let via_jp2 = decode(&wrapped, None, &Limits::default()).unwrap();
    assert_eq!(raw, via_jp2);

    // The same wrapper with a wrong ihdr is refused before decoding.
    let (_, wrong) = rewrap_fixture(&original, |c| jp2_wrapping(1955, 1841, 1, c));
    let msg = refused(&wrong, &Limits::default()).to_string();
    assert!(
        msg.contains("JP2 image header (ihdr) is 1955x1841") && msg.contains("say 1841x1955"),
        "{msg}"
    );
}
