//! What a model is, for provenance: name, backend, and hashes of the exact weights and
//! tokenizer that produced an output.

use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Which kind of backend runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A GGUF file run by candle's quantized CPU/CUDA kernels.
    Gguf,
    /// A Hugging Face safetensors checkpoint folder run by candle.
    Safetensors,
    /// A remote OpenAI-compatible endpoint (vLLM, TGI, llama.cpp server).
    #[serde(rename = "openai")]
    OpenAi,
}

impl BackendKind {
    /// The wire name: `gguf`, `safetensors` or `openai`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Gguf => "gguf",
            BackendKind::Safetensors => "safetensors",
            BackendKind::OpenAi => "openai",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity of a loaded model, recorded with every output it produces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// Human-readable name (from the model's metadata, or the file name).
    pub name: String,
    /// The backend that runs it.
    pub backend: BackendKind,
    /// Lowercase hex sha256 of the weights file(s) as loaded.
    pub weights_sha256: String,
    /// Lowercase hex sha256 of the tokenizer definition (see
    /// [`Tokenizer::sha256`](crate::Tokenizer::sha256)).
    pub tokenizer_sha256: String,
    /// The context length this instance enforces (prompt plus generated tokens).
    pub context_length: usize,
}

/// Streams a file through sha256.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_kind_serialises_as_its_wire_name() {
        assert_eq!(
            serde_json::to_string(&BackendKind::OpenAi).ok().as_deref(),
            Some("\"openai\"")
        );
        assert_eq!(
            serde_json::to_string(&BackendKind::Gguf).ok().as_deref(),
            Some("\"gguf\"")
        );
        assert_eq!(BackendKind::Safetensors.to_string(), "safetensors");
    }
}
