//! The model's own tokenizer, usable without loading any weights.
//!
//! Two sources:
//! - a Hugging Face `tokenizer.json` (what a safetensors checkpoint folder has), loaded as is;
//! - the tokenizer arrays inside a GGUF file (`tokenizer.ggml.*`). Gemma's GGUF stores a
//!   SentencePiece vocabulary with scores and no merges (`tokenizer.ggml.model = "llama"`),
//!   which candle's `TokenizerFromGguf` rejects. It is rebuilt as a byte-fallback BPE
//!   whose merges are ranked by the score of the merged piece — the SentencePiece BPE rule
//!   llama.cpp implements — and registers control and user-defined tokens so they are
//!   recognised in text.
//!
//! BOS is never added by the underlying tokenizer; [`Tokenizer::encode`] prepends it when
//! asked, so both sources behave the same.

mod spm;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Ids of the tokens the engine and the chat template need. `None` where the vocabulary has
/// no such token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence (`<bos>`, 2 for Gemma).
    pub bos: Option<u32>,
    /// End of sequence (`<eos>`, 1 for Gemma).
    pub eos: Option<u32>,
    /// Padding (`<pad>`).
    pub pad: Option<u32>,
    /// `<start_of_turn>` (105 for Gemma).
    pub start_of_turn: Option<u32>,
    /// `<end_of_turn>` (106 for Gemma).
    pub end_of_turn: Option<u32>,
}

impl SpecialTokens {
    /// The tokens that end generation: EOS and end-of-turn.
    pub fn stop_ids(&self) -> Vec<u32> {
        self.eos.into_iter().chain(self.end_of_turn).collect()
    }
}

/// Where a tokenizer was built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A Hugging Face `tokenizer.json`.
    TokenizerJson(PathBuf),
    /// The `tokenizer.ggml.*` metadata of a GGUF file.
    Gguf(PathBuf),
}

/// A model's tokenizer. Cheap to clone (shared), `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    hf: tokenizers::Tokenizer,
    special: SpecialTokens,
    sha256: String,
    source: TokenizerSource,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.inner.source)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.inner.special)
            .field("sha256", &self.inner.sha256)
            .finish()
    }
}

impl Tokenizer {
    /// Loads the tokenizer of the model at `path` without loading its weights.
    ///
    /// `path` may be a `.gguf` file, a `tokenizer.json`, or a model folder. In a folder a
    /// `tokenizer.json` is preferred; otherwise the folder must hold exactly one `.gguf` file.
    pub fn from_model_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::NotFound(path.to_path_buf()));
        }
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            if json.is_file() {
                return Self::from_tokenizer_json(&json);
            }
            return Self::from_gguf_file(&single_gguf_in(path)?);
        }
        if has_extension(path, "gguf") {
            Self::from_gguf_file(path)
        } else {
            Self::from_tokenizer_json(path)
        }
    }

    /// Loads a Hugging Face `tokenizer.json`. Its padding and truncation settings are
    /// switched off; its sha256 is that of the file's bytes.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut hf = tokenizers::Tokenizer::from_bytes(&bytes).map_err(Error::tokenizer)?;
        hf.with_padding(None);
        hf.with_truncation(None).map_err(Error::tokenizer)?;
        let special = SpecialTokens {
            bos: hf.token_to_id("<bos>").or_else(|| hf.token_to_id("<s>")),
            eos: hf.token_to_id("<eos>").or_else(|| hf.token_to_id("</s>")),
            pad: hf.token_to_id("<pad>"),
            start_of_turn: hf.token_to_id("<start_of_turn>"),
            end_of_turn: hf.token_to_id("<end_of_turn>"),
        };
        Ok(Self::from_parts(
            hf,
            special,
            hex::encode(Sha256::digest(&bytes)),
            TokenizerSource::TokenizerJson(path.to_path_buf()),
        ))
    }

    /// Builds the tokenizer from a GGUF file's metadata (tensor data is not read).
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // Buffered: the vocabulary is hundreds of thousands of small reads.
        let mut file =
            std::io::BufReader::new(std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::InvalidModel(format!("{}: {e}", path.display())))?;
        Self::from_gguf_metadata(&content.metadata, path)
    }

    pub(crate) fn from_gguf_metadata(
        metadata: &std::collections::HashMap<String, gguf_file::Value>,
        path: &Path,
    ) -> Result<Self> {
        let built = spm::from_gguf_metadata(metadata)?;
        Ok(Self::from_parts(
            built.tokenizer,
            built.special,
            built.sha256,
            TokenizerSource::Gguf(path.to_path_buf()),
        ))
    }

    fn from_parts(
        hf: tokenizers::Tokenizer,
        special: SpecialTokens,
        sha256: String,
        source: TokenizerSource,
    ) -> Self {
        Tokenizer {
            inner: Arc::new(Inner {
                hf,
                special,
                sha256,
                source,
            }),
        }
    }

    /// Token ids of `text`. Special-token text (`<start_of_turn>`, `<bos>`…) is recognised as
    /// the special token. With `add_bos` the BOS id is prepended (when the vocabulary has one).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .hf
            .encode_fast(text, false)
            .map_err(Error::tokenizer)?;
        let ids = encoding.get_ids();
        let bos = self.inner.special.bos.filter(|_| add_bos);
        let mut out = Vec::with_capacity(ids.len() + usize::from(bos.is_some()));
        out.extend(bos);
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// How many tokens `text` becomes, without BOS: exactly what the model will see for it.
    /// Note that tokens of a concatenation can differ from the sum over its parts at the seams.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self
            .inner
            .hf
            .encode_fast(text, false)
            .map_err(Error::tokenizer)?
            .len())
    }

    /// Text of `ids`. Special tokens are rendered as their text unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .hf
            .decode(ids, skip_special)
            .map_err(Error::tokenizer)
    }

    /// The special tokens' ids.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.inner.special
    }

    /// The id of a token given by its exact text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.hf.token_to_id(token)
    }

    /// The text of a token id as stored in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.hf.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.hf.get_vocab_size(true)
    }

    /// Lowercase hex sha256 of the tokenizer definition: the `tokenizer.json` bytes, or for
    /// GGUF, in order: the `tokenizer.ggml.model` string, each token as its byte length (u64
    /// little-endian) and bytes, every score (f32 LE), every token type (i32 LE).
    pub fn sha256(&self) -> &str {
        &self.inner.sha256
    }

    /// Where this tokenizer came from.
    pub fn source(&self) -> &TokenizerSource {
        &self.inner.source
    }
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// The one `.gguf` file in `dir`.
pub(crate) fn single_gguf_in(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() && has_extension(&path, "gguf") {
            found.push(path);
        }
    }
    match found.len() {
        0 => Err(Error::NotFound(dir.join("*.gguf"))),
        1 => Ok(found.remove(0)),
        n => Err(Error::InvalidModel(format!(
            "{} holds {n} .gguf files; name the file instead of the folder",
            dir.display()
        ))),
    }
}
