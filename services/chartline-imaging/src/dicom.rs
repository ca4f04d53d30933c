//! DICOM Part 10 files: stored values of frame 0, Modality LUT, VOI window, RGB.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::Codec;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::decode::{DecodedImage, Detected, Limits, SourceFormat, detect};
use crate::dicom_guard::{self, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE};
use crate::error::{ImageError, describe};
use crate::frame_header::{self, FrameHeader, FrameKind};

/// The stored values of a DICOM image's first frame, before any LUT.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredFrame {
    /// Rows (height).
    pub rows: u32,
    /// Columns (width).
    pub columns: u32,
    /// Samples per pixel (1 for greyscale, 3 for colour).
    pub samples_per_pixel: u16,
    /// `rows * columns * samples_per_pixel` values, row-major with samples interleaved
    /// (the layout of pydicom's `pixel_array`), masked to Bits Stored and sign-extended
    /// when Pixel Representation is 1. Colour is as decoded: RGB for compressed transfer
    /// syntaxes, the stored photometric interpretation for native ones.
    pub values: Vec<i32>,
}

impl std::fmt::Debug for StoredFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredFrame")
            .field("rows", &self.rows)
            .field("columns", &self.columns)
            .field("samples_per_pixel", &self.samples_per_pixel)
            .field("values", &format_args!("[{} values]", self.values.len()))
            .finish()
    }
}

/// Reads the stored values of frame 0 of a DICOM Part 10 file (with or without the
/// 128-byte preamble), under the default [`Limits`].
///
/// # Errors
/// As [`decode`](crate::decode) for DICOM input; [`ImageError::UnsupportedFormat`] when the
/// bytes are not DICOM.
pub fn dicom_stored_values(bytes: &[u8]) -> Result<StoredFrame, ImageError> {
    let limits = Limits::default();
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooLarge {
            what: "input bytes",
            actual: bytes.len() as u64,
            limit: limits.max_bytes as u64,
        });
    }
    match detect(bytes) {
        Ok(Detected::Dicom { magic_at }) => {
            let file = open(&bytes[magic_at..])?;
            let module = PixelModule::read(&file.object)?;
            module.check_limits(&limits)?;
            let (values, _) = stored_values(&file, &module, &limits)?;
            Ok(StoredFrame {
                rows: module.rows,
                columns: module.columns,
                samples_per_pixel: module.samples_per_pixel,
                values,
            })
        }
        Ok(other) => Err(ImageError::UnsupportedFormat {
            content_type: None,
            found: format!("{}, not DICOM", other.name()),
        }),
        Err(found) => Err(ImageError::UnsupportedFormat {
            content_type: None,
            found: found.to_owned(),
        }),
    }
}

struct OpenFile {
    object: DefaultDicomObject,
    transfer_syntax: String,
}

/// `data` starts at the `DICM` magic.
fn open(data: &[u8]) -> Result<OpenFile, ImageError> {
    let declared_ts = dicom_guard::check(data)?;
    match declared_ts.as_deref() {
        Some(EXPLICIT_VR_BE) => {
            return Err(ImageError::unsupported_dicom(format!(
                "transfer syntax {EXPLICIT_VR_BE} (Explicit VR Big Endian, retired) is not \
                 supported; re-encode as Explicit VR Little Endian (1.2.840.10008.1.2.1)"
            )));
        }
        Some(DEFLATED_EXPLICIT_VR_LE) => {
            return Err(ImageError::unsupported_dicom(format!(
                "transfer syntax {DEFLATED_EXPLICIT_VR_LE} (Deflated Explicit VR Little Endian) \
                 is not supported; re-encode as Explicit VR Little Endian (1.2.840.10008.1.2.1)"
            )));
        }
        _ => {}
    }
    let object = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(data)
        .map_err(|e| ImageError::corrupt("DICOM", describe(&e)))?;
    let transfer_syntax = object
        .meta()
        .transfer_syntax()
        .trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_owned();
    Ok(OpenFile {
        object,
        transfer_syntax,
    })
}

/// The Image Pixel module attributes this crate uses.
struct PixelModule {
    rows: u32,
    columns: u32,
    samples_per_pixel: u16,
    photometric: String,
    bits_allocated: u16,
    bits_stored: u16,
    high_bit: u16,
    signed: bool,
    planar: bool,
    frames: u32,
}

fn required_u16(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<u16, ImageError> {
    let element =
        obj.element_opt(tag).ok().flatten().ok_or_else(|| {
            ImageError::unsupported_dicom(format!("missing attribute {name} {tag}"))
        })?;
    element.to_int::<u16>().map_err(|_| {
        ImageError::corrupt(
            "DICOM",
            format!("attribute {name} {tag} is not an unsigned 16-bit integer"),
        )
    })
}

fn optional_u16(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<Option<u16>, ImageError> {
    match obj.element_opt(tag).ok().flatten() {
        None => Ok(None),
        Some(e) if e.value().multiplicity() == 0 => Ok(None),
        Some(_) => required_u16(obj, tag, name).map(Some),
    }
}

fn optional_str(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let element = obj.element_opt(tag).ok().flatten()?;
    let text = element.to_str().ok()?;
    let text = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!text.is_empty()).then(|| text.to_owned())
}

/// First value of a decimal-string attribute; `None` if absent, empty or unparsable.
fn optional_first_f64(obj: &DefaultDicomObject, tag: Tag) -> Option<f64> {
    let element = obj.element_opt(tag).ok().flatten()?;
    let values = element.to_multi_float64().ok()?;
    values.first().copied().filter(|v| v.is_finite())
}

impl PixelModule {
    fn read(obj: &DefaultDicomObject) -> Result<Self, ImageError> {
        let rows = required_u16(obj, tags::ROWS, "Rows")?;
        let columns = required_u16(obj, tags::COLUMNS, "Columns")?;
        let samples_per_pixel = required_u16(obj, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?;
        let bits_allocated = required_u16(obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
        let bits_stored = required_u16(obj, tags::BITS_STORED, "BitsStored")?;
        let high_bit =
            optional_u16(obj, tags::HIGH_BIT, "HighBit")?.unwrap_or(bits_stored.saturating_sub(1));
        let pixel_representation =
            optional_u16(obj, tags::PIXEL_REPRESENTATION, "PixelRepresentation")?.unwrap_or(0);
        let planar =
            optional_u16(obj, tags::PLANAR_CONFIGURATION, "PlanarConfiguration")?.unwrap_or(0) == 1;
        let photometric = optional_str(obj, tags::PHOTOMETRIC_INTERPRETATION).ok_or_else(|| {
            ImageError::unsupported_dicom("missing attribute PhotometricInterpretation (0028,0004)")
        })?;
        let frames = match optional_str(obj, tags::NUMBER_OF_FRAMES) {
            None => 1,
            Some(text) => text.parse::<u32>().map_err(|_| {
                ImageError::corrupt("DICOM", "NumberOfFrames (0028,0008) is not an integer")
            })?,
        };
        if rows == 0 || columns == 0 || frames == 0 {
            return Err(ImageError::corrupt(
                "DICOM",
                format!("empty image: Rows {rows}, Columns {columns}, NumberOfFrames {frames}"),
            ));
        }
        if !matches!(bits_allocated, 8 | 16 | 32) {
            return Err(ImageError::unsupported_dicom(format!(
                "BitsAllocated {bits_allocated} (supported: 8, 16, 32)"
            )));
        }
        if bits_stored == 0
            || bits_stored > bits_allocated
            || high_bit >= bits_allocated
            || high_bit + 1 < bits_stored
        {
            return Err(ImageError::corrupt(
                "DICOM",
                format!(
                    "inconsistent bit layout: BitsAllocated {bits_allocated}, BitsStored \
                     {bits_stored}, HighBit {high_bit}"
                ),
            ));
        }
        Ok(Self {
            rows: rows.into(),
            columns: columns.into(),
            samples_per_pixel,
            photometric,
            bits_allocated,
            bits_stored,
            high_bit,
            signed: pixel_representation == 1,
            planar,
            frames,
        })
    }

    fn check_limits(&self, limits: &Limits) -> Result<(), ImageError> {
        limits.check_dimensions(self.columns, self.rows)
    }

    fn pixels(&self) -> usize {
        self.rows as usize * self.columns as usize
    }

    fn bytes_per_sample(&self) -> usize {
        usize::from(self.bits_allocated / 8)
    }

    fn is_native_ybr_422(&self) -> bool {
        self.photometric == "YBR_FULL_422"
    }
}

/// Where frame 0's samples came from, which decides what their colour space is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Native (uncompressed) pixel data: samples are in the stored photometric interpretation.
    Native,
    /// A codec's output: colour is RGB (the `PixelDataReader` contract).
    Decoded,
}

/// Frame 0's samples as `i32`, interleaved.
fn stored_values(
    file: &OpenFile,
    m: &PixelModule,
    limits: &Limits,
) -> Result<(Vec<i32>, Origin), ImageError> {
    let element = file
        .object
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .ok_or_else(|| ImageError::unsupported_dicom("no Pixel Data (7FE0,0010): not an image"))?;
    let spp = usize::from(m.samples_per_pixel);
    let bps = m.bytes_per_sample();
    let (bytes, origin) = if let Some(primitive) = element.value().primitive() {
        let all = primitive.to_bytes();
        let frame_len = if m.is_native_ybr_422() {
            m.pixels() * 2 * bps
        } else {
            m.pixels() * spp * bps
        };
        let frame = all.get(..frame_len).ok_or_else(|| {
            ImageError::corrupt(
                "DICOM",
                format!(
                    "Pixel Data has {} bytes but frame 0 needs {frame_len} ({} x {} x {} samples x {} bytes)",
                    all.len(),
                    m.rows,
                    m.columns,
                    spp,
                    bps
                ),
            )
        })?;
        (frame.to_vec(), Origin::Native)
    } else {
        (decode_encapsulated(file, m, limits)?, Origin::Decoded)
    };
    let needed = m.pixels() * spp * bps;
    let samples_in_buffer = if origin == Origin::Native && m.is_native_ybr_422() {
        m.pixels() * 2
    } else {
        m.pixels() * spp
    };
    if origin == Origin::Decoded && bytes.len() < needed {
        return Err(ImageError::corrupt(
            "DICOM",
            format!(
                "decoder returned {} bytes for frame 0, expected {needed}",
                bytes.len()
            ),
        ));
    }
    let shift = u32::from(m.high_bit + 1 - m.bits_stored);
    let bits = u32::from(m.bits_stored);
    let mask: u32 = if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    let sign_bit = 1u32 << (bits - 1);
    let convert = |raw: u32| -> i32 {
        let v = (raw >> shift) & mask;
        if m.signed && v & sign_bit != 0 {
            // Sign-extend from `bits` bits.
            (v | !mask) as i32
        } else {
            v as i32
        }
    };
    let raw: Vec<i32> = match bps {
        1 => bytes[..samples_in_buffer]
            .iter()
            .map(|&b| convert(b.into()))
            .collect(),
        2 => bytes[..samples_in_buffer * 2]
            .chunks_exact(2)
            .map(|c| convert(u16::from_le_bytes([c[0], c[1]]).into()))
            .collect(),
        _ => bytes[..samples_in_buffer * 4]
            .chunks_exact(4)
            .map(|c| convert(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    };
    let values = if origin == Origin::Native && spp == 3 && m.is_native_ybr_422() {
        expand_ybr_422(&raw, m)?
    } else if origin == Origin::Native && spp == 3 && m.planar {
        let n = m.pixels();
        (0..n * 3).map(|i| raw[(i % 3) * n + i / 3]).collect()
    } else {
        raw
    };
    Ok((values, origin))
}

/// Native YBR_FULL_422 stores two horizontally adjacent pixels as `Y1 Y2 Cb Cr`.
fn expand_ybr_422(raw: &[i32], m: &PixelModule) -> Result<Vec<i32>, ImageError> {
    if !m.columns.is_multiple_of(2) || m.planar {
        return Err(ImageError::unsupported_dicom(
            "native YBR_FULL_422 with an odd number of columns or PlanarConfiguration 1",
        ));
    }
    let mut out = Vec::with_capacity(m.pixels() * 3);
    for quad in raw.chunks_exact(4) {
        let (y1, y2, cb, cr) = (quad[0], quad[1], quad[2], quad[3]);
        out.extend_from_slice(&[y1, cb, cr, y2, cb, cr]);
    }
    Ok(out)
}

fn decode_encapsulated(
    file: &OpenFile,
    m: &PixelModule,
    limits: &Limits,
) -> Result<Vec<u8>, ImageError> {
    let uid = file.transfer_syntax.as_str();
    let ts = TransferSyntaxRegistry
        .get(uid)
        .ok_or_else(|| ImageError::unsupported_dicom(format!("unknown transfer syntax {uid}")))?;
    let Codec::EncapsulatedPixelData(Some(reader), _) = ts.codec() else {
        return Err(ImageError::unsupported_dicom(format!(
            "transfer syntax {uid} ({}) cannot be decoded by this build (supported: native, \
             JPEG baseline/extended/lossless, JPEG 2000, RLE lossless)",
            ts.name()
        )));
    };
    check_frame_header(file, m, limits)?;
    let mut out = Vec::new();
    // The codecs index their buffers by the attributes and the codestream header; a
    // disagreement between the two is a panic in some of them, which must not take the
    // service down.
    let result = catch_unwind(AssertUnwindSafe(|| {
        reader.decode_frame(&file.object, 0, &mut out)
    }));
    match result {
        Ok(Ok(())) => Ok(out),
        Ok(Err(e)) => Err(ImageError::corrupt(
            "DICOM",
            format!("cannot decode {} pixel data: {}", ts.name(), describe(&e)),
        )),
        Err(_) => Err(ImageError::corrupt(
            "DICOM",
            format!(
                "the {} decoder failed on frame 0 (codestream inconsistent with the DICOM attributes)",
                ts.name()
            ),
        )),
    }
}

/// Checks the header of frame 0's compressed data (JPEG SOF, JP2 `ihdr` and codestream
/// SIZ, JPEG 2000 SIZ) against the attributes and the limits, before the codec allocates
/// for the size the header declares: `jpeg-decoder` allocates whatever a SOF declares
/// (65535 x 65535 x 3 is 12 GiB), and a failed allocation aborts the process, which
/// `catch_unwind` cannot stop. Frames in any other format are left to the codec.
fn check_frame_header(file: &OpenFile, m: &PixelModule, limits: &Limits) -> Result<(), ImageError> {
    let Some(value) = file
        .object
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .map(|e| e.value())
    else {
        return Err(ImageError::unsupported_dicom(
            "no Pixel Data (7FE0,0010): not an image",
        ));
    };
    let fragments = value.fragments().unwrap_or_default();
    if fragments.is_empty() {
        return Err(ImageError::corrupt(
            "DICOM",
            "encapsulated Pixel Data has no fragments",
        ));
    }
    let offset_table = value.offset_table().unwrap_or_default();
    let frame = frame_0(fragments, offset_table, m.frames);
    if frame.is_empty() {
        return Err(ImageError::corrupt(
            "DICOM",
            "encapsulated Pixel Data has no data for frame 0",
        ));
    }
    let corrupt = |detail: String| ImageError::corrupt("DICOM", detail);
    match frame_header::sniff(&frame) {
        Some(FrameKind::Jpeg) => {
            let header = frame_header::jpeg(&frame).map_err(corrupt)?;
            agree(m, limits, "JPEG frame header (SOF)", header)
        }
        Some(FrameKind::J2k) => {
            let header = frame_header::j2k(&frame).map_err(corrupt)?;
            agree(m, limits, "JPEG 2000 codestream (SIZ)", header)
        }
        Some(FrameKind::Jp2) => {
            let header = frame_header::jp2(&frame).map_err(corrupt)?;
            agree(m, limits, "JP2 image header (ihdr)", header.image)?;
            agree(m, limits, "JP2 codestream (SIZ)", header.codestream)
        }
        None => Ok(()),
    }
}

/// Frame 0's bytes, gathered from the fragments as the codec adapters of
/// dicom-transfer-syntax-registry gather them: the first fragment when there is one
/// fragment or one per frame, else the fragments from the first Basic Offset Table entry
/// (or the start) up to the second.
fn frame_0<'a>(fragments: &'a [Vec<u8>], offset_table: &[u32], frames: u32) -> Cow<'a, [u8]> {
    if fragments.len() == 1 || fragments.len() == frames as usize {
        return fragments
            .first()
            .map_or(Cow::Borrowed(&[][..]), |f| Cow::Borrowed(f.as_slice()));
    }
    let start = offset_table.first().map_or(0, |&o| o as usize);
    let next = offset_table.get(1).map(|&o| o as usize);
    let mut offset = 0usize;
    let mut out = Vec::new();
    for fragment in fragments {
        if offset >= start {
            out.extend_from_slice(fragment);
        }
        offset = offset.saturating_add(fragment.len()).saturating_add(8);
        if next.is_some_and(|next| offset >= next) {
            break;
        }
    }
    Cow::Owned(out)
}

/// `header` (what the compressed frame declares) within the limits and equal to
/// Columns, Rows and Samples per Pixel.
fn agree(
    m: &PixelModule,
    limits: &Limits,
    what: &str,
    header: FrameHeader,
) -> Result<(), ImageError> {
    limits.check_dimensions(header.width, header.height)?;
    let spp = u32::from(m.samples_per_pixel);
    if (header.width, header.height, header.components) != (m.columns, m.rows, spp) {
        return Err(ImageError::corrupt(
            "DICOM",
            format!(
                "{what} is {}x{} with {} components but Columns/Rows/SamplesPerPixel say \
                 {}x{} with {spp}",
                header.width, header.height, header.components, m.columns, m.rows
            ),
        ));
    }
    Ok(())
}

pub(crate) fn decode(data: &[u8], limits: &Limits) -> Result<DecodedImage, ImageError> {
    let file = open(data)?;
    let m = PixelModule::read(&file.object)?;
    m.check_limits(limits)?;
    let photometric = m.photometric.as_str();
    let spp = m.samples_per_pixel;
    match (photometric, spp) {
        ("MONOCHROME1" | "MONOCHROME2", 1) => {}
        ("RGB" | "YBR_FULL" | "YBR_FULL_422", 3) => {}
        ("YBR_ICT" | "YBR_RCT" | "YBR_PARTIAL_420" | "YBR_PARTIAL_422", 3) => {}
        _ => {
            return Err(ImageError::unsupported_dicom(format!(
                "PhotometricInterpretation {photometric} with SamplesPerPixel {spp} (supported: \
                 MONOCHROME1/2 with 1 sample, RGB/YBR_FULL/YBR_FULL_422 with 3)"
            )));
        }
    }
    let (values, origin) = stored_values(&file, &m, limits)?;
    let rgb = if spp == 1 {
        let grey = render_grey(&file.object, &values, photometric == "MONOCHROME1");
        grey.iter().flat_map(|&v| [v, v, v]).collect()
    } else {
        let colour = if origin == Origin::Decoded {
            "RGB"
        } else {
            photometric
        };
        render_colour(&values, colour, m.bits_stored)?
    };
    Ok(DecodedImage {
        width: m.columns,
        height: m.rows,
        rgb,
        format: SourceFormat::Dicom {
            transfer_syntax: file.transfer_syntax.clone(),
            photometric: m.photometric.clone(),
            frames: m.frames,
        },
    })
}

/// The VOI LUT Function (0028,1056) variants of PS3.3 C.11.2.1.3.
#[derive(Debug, Clone, Copy, PartialEq)]
enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

/// Modality LUT (Rescale Slope/Intercept), then VOI: the first Window Center/Width with
/// the VOI LUT Function (LINEAR by default), else the frame's min-max, onto 0..=255.
fn render_grey(obj: &DefaultDicomObject, stored: &[i32], monochrome1: bool) -> Vec<u8> {
    let slope = optional_first_f64(obj, tags::RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = optional_first_f64(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    let function = match optional_str(obj, tags::VOILUT_FUNCTION).as_deref() {
        Some("LINEAR_EXACT") => VoiFunction::LinearExact,
        Some("SIGMOID") => VoiFunction::Sigmoid,
        _ => VoiFunction::Linear,
    };
    let window = match (
        optional_first_f64(obj, tags::WINDOW_CENTER),
        optional_first_f64(obj, tags::WINDOW_WIDTH),
    ) {
        (Some(center), Some(width))
            if width >= 1.0 || (function != VoiFunction::Linear && width > 0.0) =>
        {
            Some((center, width))
        }
        _ => None,
    };
    let modality = |v: i32| f64::from(v) * slope + intercept;
    let voi: Box<dyn Fn(f64) -> f64> = match window {
        Some((c, w)) => Box::new(move |x| window_value(x, c, w, function)),
        None => {
            let (lo, hi) =
                stored
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                        let x = modality(v);
                        (lo.min(x), hi.max(x))
                    });
            let range = hi - lo;
            Box::new(move |x| {
                if range > 0.0 {
                    (x - lo) / range * 255.0
                } else {
                    0.0
                }
            })
        }
    };
    stored
        .iter()
        .map(|&v| {
            let y = voi(modality(v)).round().clamp(0.0, 255.0) as u8;
            if monochrome1 { 255 - y } else { y }
        })
        .collect()
}

/// PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID),
/// with output range 0..=255.
fn window_value(x: f64, c: f64, w: f64, function: VoiFunction) -> f64 {
    const Y_MAX: f64 = 255.0;
    match function {
        VoiFunction::Linear => {
            if w <= 1.0 {
                // A width of 1 is a threshold at c - 0.5.
                return if x <= c - 0.5 { 0.0 } else { Y_MAX };
            }
            let lower = c - 0.5 - (w - 1.0) / 2.0;
            let upper = c - 0.5 + (w - 1.0) / 2.0;
            if x <= lower {
                0.0
            } else if x > upper {
                Y_MAX
            } else {
                ((x - (c - 0.5)) / (w - 1.0) + 0.5) * Y_MAX
            }
        }
        VoiFunction::LinearExact => {
            if x <= c - w / 2.0 {
                0.0
            } else if x > c + w / 2.0 {
                Y_MAX
            } else {
                ((x - c) / w + 0.5) * Y_MAX
            }
        }
        VoiFunction::Sigmoid => Y_MAX / (1.0 + (-4.0 * (x - c) / w).exp()),
    }
}

fn render_colour(
    values: &[i32],
    photometric: &str,
    bits_stored: u16,
) -> Result<Vec<u8>, ImageError> {
    // Samples wider than 8 bits keep their top 8 bits.
    let down = u32::from(bits_stored.saturating_sub(8));
    let to8 = |v: i32| (v.max(0) >> down).min(255) as u8;
    match photometric {
        "RGB" => Ok(values.iter().map(|&v| to8(v)).collect()),
        "YBR_FULL" | "YBR_FULL_422" => Ok(values
            .chunks_exact(3)
            .flat_map(|p| ybr_full_to_rgb(to8(p[0]), to8(p[1]), to8(p[2])))
            .collect()),
        other => Err(ImageError::unsupported_dicom(format!(
            "native (uncompressed) PhotometricInterpretation {other}"
        ))),
    }
}

/// PS3.3 C.7.6.3.1.2 YBR_FULL to RGB (ITU-R BT.601 full range).
fn ybr_full_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let (y, cb, cr) = (f64::from(y), f64::from(cb) - 128.0, f64::from(cr) - 128.0);
    let r = y + 1.402 * cr;
    let g = y - 0.344_136 * cb - 0.714_136 * cr;
    let b = y + 1.772 * cb;
    [r, g, b].map(|v| v.round().clamp(0.0, 255.0) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_window_matches_the_standard_at_its_edges() {
        // Window 40/400 (soft tissue): [-160.5, 239.5] maps onto 0..255.
        assert_eq!(window_value(-161.0, 40.0, 400.0, VoiFunction::Linear), 0.0);
        assert_eq!(window_value(240.0, 40.0, 400.0, VoiFunction::Linear), 255.0);
        let mid = window_value(39.5, 40.0, 400.0, VoiFunction::Linear);
        assert!(
            (mid - 127.5).abs() < 1e-9,
            "centre - 0.5 maps to the middle: {mid}"
        );
    }

    #[test]
    fn width_one_window_is_a_threshold() {
        assert_eq!(window_value(9.5, 10.0, 1.0, VoiFunction::Linear), 0.0);
        assert_eq!(window_value(9.6, 10.0, 1.0, VoiFunction::Linear), 255.0);
    }

    #[test]
    fn ybr_full_grey_stays_grey_and_primaries_convert() {
        assert_eq!(ybr_full_to_rgb(100, 128, 128), [100, 100, 100]);
        // Pure red in BT.601 full range: Y 76, Cb 85, Cr 255.
        let [r, g, b] = ybr_full_to_rgb(76, 85, 255);
        assert!(r >= 253 && g <= 2 && b <= 2, "red: {r} {g} {b}");
    }
}
