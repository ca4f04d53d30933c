//! The model's tokenizer as the timeline's token counter: prompts are budgeted with the
//! exact tokenizer the inference service uses.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use chartline_inference::Tokenizer;
use chartline_timeline::TokenCounter;

/// Counts with the model's own tokenizer.
pub struct ModelTokenCounter {
    tokenizer: Tokenizer,
    describe: String,
}

impl ModelTokenCounter {
    /// Loads only the tokenizer of the model at `path` (a GGUF file or a Hugging Face folder).
    pub fn load(path: &Path) -> anyhow::Result<Arc<Self>> {
        let tokenizer = Tokenizer::from_model_path(path).with_context(|| format!("loading the tokenizer of {}", path.display()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let describe = format!("{name} tokenizer sha256:{}", tokenizer.sha256());
        Ok(Arc::new(ModelTokenCounter { tokenizer, describe }))
    }
}

impl TokenCounter for ModelTokenCounter {
    fn count(&self, text: &str) -> usize {
        // Encoding plain text cannot fail; if it ever did, bytes bound the token count from above.
        self.tokenizer.count_tokens(text).unwrap_or(text.len())
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
