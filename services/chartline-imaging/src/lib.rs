//! Medical images for Chartline's models: decoding PNG, JPEG and DICOM into 8-bit RGB, and
//! the model preprocessing of Hugging Face's `Gemma3ImageProcessor` / `SiglipImageProcessor`
//! into channels-first `f32` buffers. No tensor library: the inference crate turns the
//! returned `Vec<f32>` into tensors.
//!
//! # Decoding
//! [`decode`] detects the format from the bytes, cross-checks a declared content type, and
//! enforces [`Limits`] before decoding. PNG goes through the `png` crate, JPEG through
//! `jpeg-decoder`; both are converted to RGB as Pillow's `convert("RGB")` does, so PNG
//! pixels equal what a Python pipeline built on `PIL.Image.open` sees (see [`decode`] for
//! the 16-bit cases) and JPEG pixels differ from libjpeg-turbo's by rare single levels.
//!
//! DICOM goes through dicom-rs with pure-Rust codecs (JPEG 2000 via `openjp2`, JPEG, RLE).
//! Before a compressed frame reaches its codec, the size its own header declares (JPEG
//! SOF, JP2 `ihdr` and the codestream's SIZ, JPEG 2000 SIZ) must be within the [`Limits`]
//! and equal Columns, Rows and Samples per Pixel.
//! Frame 0 is rendered as follows:
//! * greyscale (MONOCHROME1/2): stored values, then the Modality LUT (Rescale Slope and
//!   Intercept), then VOI — the first Window Center/Width with the VOI LUT Function
//!   (LINEAR per PS3.3 C.11.2.1.2, LINEAR_EXACT, SIGMOID) when present, else the frame's
//!   min–max — onto 0..=255, rounded; MONOCHROME1 is inverted. Modality and VOI LUT
//!   *sequences* are not applied.
//! * colour: RGB as stored (either planar configuration), YBR_FULL and YBR_FULL_422
//!   converted to RGB; compressed colour comes out of the codec as RGB. Samples wider than
//!   8 bits keep their top 8 bits.
//!
//! [`dicom_stored_values`] exposes the stored values before any LUT, for comparison with
//! pydicom's `pixel_array`.
//!
//! # Preprocessing
//! [`Preprocessor`] reads a `preprocessor_config.json` and reproduces the processor:
//! resize with Pillow's resampling (re-implemented exactly, see [`resize_rgb8`]), rescale,
//! normalise, channels first.
//!
//! Nothing here logs, and no error message contains pixel data.

mod decode;
mod dicom;
mod dicom_guard;
mod error;
mod frame_header;
mod preprocess;
mod raster;
mod resample;

pub use decode::{DecodedImage, Limits, SourceFormat, decode};
pub use dicom::{StoredFrame, dicom_stored_values};
pub use error::ImageError;
pub use preprocess::Preprocessor;
pub use resample::{Filter, resize_rgb8};
