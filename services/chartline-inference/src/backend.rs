//! The backend trait every text-generation backend implements, and the events it produces.

use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
use crate::error::Result;
use crate::identity::ModelIdentity;
use crate::params::GenerateParams;
use crate::tokenizer::Tokenizer;

/// One generated token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratedToken {
    /// The token id.
    pub id: u32,
    /// Output text released with this token. Concatenating every token's `text` gives the
    /// output. It can be empty (an incomplete UTF-8 sequence, a special token, or text held
    /// back because it may begin a stop sequence) and then arrives with a later token.
    pub text: String,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end token (`<eos>` or `<end_of_turn>`).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The output reached one of the request's stop sequences.
    StopSequence,
    /// The consumer went away (the stream was dropped).
    Cancelled,
}

impl FinishReason {
    /// The wire name: `stop`, `length`, `stop_sequence` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts of one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens, BOS included.
    pub prompt_tokens: usize,
    /// Tokens the model generated, including an end token or the token that completed a stop
    /// sequence: one per [`GenerationEvent::Token`].
    pub completion_tokens: usize,
}

/// How a generation ended, with what it needs for provenance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// Token counts.
    pub usage: Usage,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The model that generated.
    pub model: ModelIdentity,
    /// The sampling seed used (`None` for greedy decoding). Replaying with this seed and the
    /// same parameters reproduces the output on the same backend.
    pub seed: Option<u64>,
}

/// What a generation stream yields: tokens as they come, then one `Finished`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GenerationEvent {
    /// A token and the text it released.
    Token(GeneratedToken),
    /// The end; nothing follows.
    Finished(Completion),
}

/// One generation request as a backend receives it, parameters already validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    /// Raw prompt text (templating, e.g. [`chat_prompt`](crate::chat_prompt), is the
    /// caller's); the backend tokenizes it with BOS.
    pub prompt: String,
    /// The conversation `prompt` was rendered from, when the caller started from chat
    /// messages ([`Engine::generate_chat`](crate::Engine::generate_chat)). Local backends
    /// run `prompt` and ignore this; a remote chat endpoint
    /// ([`OpenAiBackend`](crate::OpenAiBackend)) applies its own chat template, so it sends
    /// these instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// How to generate.
    pub params: GenerateParams,
    /// Images for a multimodal model, one per `<start_of_image>` placeholder of `prompt`,
    /// in order. Empty for text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageInput>,
}

/// One image of a request: the file's bytes as the chart holds them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInput {
    /// PNG, JPEG or DICOM bytes.
    pub data: Vec<u8>,
    /// `image/png`, `image/jpeg` or `application/dicom`; `None` detects from the bytes.
    pub content_type: Option<String>,
    /// Where it came from (e.g. `DocumentReference/abc`): an id, named in errors about
    /// the image.
    pub source: Option<String>,
}

impl std::fmt::Debug for ImageInput {
    // Never the bytes: they are patient data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageInput")
            .field("bytes", &self.data.len())
            .field("content_type", &self.content_type)
            .field("source", &self.source)
            .finish()
    }
}

/// Where a backend delivers tokens.
pub trait TokenSink {
    /// Delivers one token. Returns `false` when the consumer is gone: the backend should stop
    /// and report [`FinishReason::Cancelled`].
    fn token(&mut self, token: GeneratedToken) -> bool;

    /// Whether the consumer is gone, for long steps (prefill) to check between chunks.
    fn is_cancelled(&self) -> bool;
}

/// A text-generation backend: a local model (GGUF today, safetensors later) or a remote
/// OpenAI-compatible endpoint. The [`Engine`](crate::Engine) gives each backend its own
/// thread and calls it one request at a time, with parameters already validated.
pub trait Backend: Send + 'static {
    /// The model's identity.
    fn identity(&self) -> &ModelIdentity;

    /// The model's tokenizer, where the backend has one locally.
    fn tokenizer(&self) -> Option<&Tokenizer>;

    /// How the model takes images; `None` (the default) when it takes none.
    fn image_support(&self) -> Option<&crate::gemma3::ImageSupport> {
        None
    }

    /// Generates for `request`, delivering tokens to `sink`, and returns how it ended.
    /// Errors that concern the request (an over-long prompt) are
    /// [`InvalidArgument`](crate::ErrorCategory::InvalidArgument).
    fn generate(
        &mut self,
        request: &GenerationRequest,
        sink: &mut dyn TokenSink,
    ) -> Result<Completion>;
}
