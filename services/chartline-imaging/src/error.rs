//! The one error type of this crate.

use std::path::PathBuf;

/// Why an image could not be decoded or a preprocessor config could not be loaded.
///
/// Messages are written for the engineer integrating a client: they name the format,
/// the limit, the DICOM attribute or the config key, and never contain pixel data or
/// any other bytes of the image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The input, or the image it declares, exceeds a configured [`Limits`](crate::Limits) value.
    #[error("image too large: {what} is {actual}, the limit is {limit}")]
    TooLarge {
        /// What was measured: `"input bytes"`, `"width"`, `"height"`, `"pixels"`,
        /// `"decoded size in bytes"`.
        what: &'static str,
        /// The measured value (for `"decoded size in bytes"`, the decoder's request).
        actual: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The bytes are not PNG, JPEG or DICOM, or they disagree with the declared content type.
    #[error("{}", unsupported_format_message(content_type.as_deref(), found))]
    UnsupportedFormat {
        /// The declared content type, if any (trimmed to 100 characters).
        content_type: Option<String>,
        /// What the magic bytes say the data is, e.g. `"GIF image"`, `"PDF document"`.
        found: String,
    },
    /// The data starts like the named format but cannot be decoded.
    #[error("corrupt {format} data: {detail}")]
    Corrupt {
        /// `"PNG"`, `"JPEG"` or `"DICOM"`.
        format: &'static str,
        /// What the decoder reported.
        detail: String,
    },
    /// A well-formed DICOM file this crate does not render (transfer syntax, photometric
    /// interpretation, bit depth, missing attribute).
    #[error("unsupported DICOM: {what}")]
    UnsupportedDicom {
        /// What is unsupported, naming the UID, attribute or value.
        what: String,
    },
    /// A `preprocessor_config.json` key is missing, malformed or names an unsupported option.
    #[error("invalid preprocessor config: `{key}`: {detail}")]
    InvalidConfig {
        /// The JSON key (`size`, `resample`, `image_mean`, ...), or `<json>` for a syntax error.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A preprocessor config file could not be read.
    #[error("cannot read preprocessor config {}: {source}", path.display())]
    Io {
        /// The file that was read.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
}

fn unsupported_format_message(content_type: Option<&str>, found: &str) -> String {
    match content_type {
        Some(ct) => format!(
            "unsupported image: content type `{ct}` with data that is {found}; \
             send PNG (`image/png`), JPEG (`image/jpeg`) or DICOM (`application/dicom`) \
             with a matching content type"
        ),
        None => format!(
            "unsupported image: the data is {found}; send PNG, JPEG or DICOM (Part 10 file)"
        ),
    }
}

impl ImageError {
    pub(crate) fn corrupt(format: &'static str, detail: impl Into<String>) -> Self {
        ImageError::Corrupt {
            format,
            detail: detail.into(),
        }
    }

    pub(crate) fn unsupported_dicom(what: impl Into<String>) -> Self {
        ImageError::UnsupportedDicom { what: what.into() }
    }

    pub(crate) fn invalid_config(key: &str, detail: impl Into<String>) -> Self {
        ImageError::InvalidConfig {
            key: key.to_owned(),
            detail: detail.into(),
        }
    }
}

/// A decoder's error message with its causes, bounded in length: the libraries' messages
/// describe structure (offsets, tags, markers), but the bound keeps a pathological message
/// out of logs.
pub(crate) fn describe(err: &dyn std::error::Error) -> String {
    const MAX: usize = 400;
    let mut out = err.to_string();
    let mut source = err.source();
    let mut depth = 0;
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
        depth += 1;
        if depth >= 4 {
            break;
        }
    }
    truncate_chars(&out, MAX)
}

pub(crate) fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((idx, _)) => format!("{}…", &s[..idx]),
        None => s.to_owned(),
    }
}
