//! The crate's one error type and its protocol-neutral category.

use std::path::PathBuf;

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is, independent of any wire protocol. The gRPC layer
/// maps these to status codes in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCategory {
    /// The caller sent something unusable (a bad parameter, an empty or over-long prompt).
    InvalidArgument,
    /// A model file or folder does not exist.
    NotFound,
    /// The model is not loaded or its worker has stopped; retrying later may help.
    Unavailable,
    /// A fault inside the model or its files; not the caller's doing.
    Internal,
}

/// An inference failure. Never carries prompt text or generated text, only shapes,
/// counts, field names and file paths.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is out of range or malformed. `field` names it as the caller
    /// spelled it (`temperature`, `stop[2]`, `prompt`).
    #[error("{field} {reason}")]
    InvalidArgument {
        /// The offending field.
        field: String,
        /// What is wrong with it, including the limit.
        reason: String,
    },
    /// A model file or folder is missing.
    #[error("not found: {}", .0.display())]
    NotFound(PathBuf),
    /// The engine cannot take work (its worker thread is gone).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Reading a model file failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A model or tokenizer file is malformed or of an unsupported kind.
    #[error("unsupported or malformed model: {0}")]
    InvalidModel(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The tokenizer failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// Anything else that should not happen.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A request field error: `Error::invalid("temperature", "must be in [0, 2]")` displays as
    /// `temperature must be in [0, 2]`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The protocol-neutral category of this error.
    pub fn category(&self) -> ErrorCategory {
        match self {
            Error::InvalidArgument { .. } => ErrorCategory::InvalidArgument,
            Error::NotFound(_) => ErrorCategory::NotFound,
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorCategory::NotFound
            }
            Error::Unavailable(_) => ErrorCategory::Unavailable,
            Error::Io { .. }
            | Error::InvalidModel(_)
            | Error::Tensor(_)
            | Error::Tokenizer(_)
            | Error::Internal(_) => ErrorCategory::Internal,
        }
    }

    /// The request field an [`Error::InvalidArgument`] is about.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument { field, .. } => Some(field),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tokenizer(err: impl std::fmt::Display) -> Self {
        Error::Tokenizer(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field_first() {
        let e = Error::invalid("temperature", "must be in [0, 2] (got -1)");
        assert_eq!(e.to_string(), "temperature must be in [0, 2] (got -1)");
        assert_eq!(e.category(), ErrorCategory::InvalidArgument);
        assert_eq!(e.field(), Some("temperature"));
    }

    #[test]
    fn missing_file_is_not_found() {
        let e = Error::io("/nope", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(e.category(), ErrorCategory::NotFound);
    }
}
