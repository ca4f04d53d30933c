//! The engine: one OS thread owns each model; requests reach it over a channel.
//!
//! Model work is CPU-bound and long (seconds), so it never runs on the async runtime. The
//! worker takes one request at a time (a model holds one sequence's KV cache) and sends
//! events back over a per-request channel. When the caller drops its stream, the next send
//! fails (or the prefill notices between chunks) and the worker stops that request and moves
//! on to the next.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::backend::{
    Backend, Completion, FinishReason, GeneratedToken, GenerationEvent, GenerationRequest,
    ImageInput, TokenSink,
};
use crate::chat::{ChatMessage, chat_prompt};
use crate::error::{Error, Result};
use crate::gemma3::ImageSupport;
use crate::gemma3::{GgufOptions, SafetensorsOptions, load_gguf, load_safetensors};
use crate::identity::ModelIdentity;
use crate::params::GenerateParams;
use crate::tokenizer::Tokenizer;

struct Job {
    request: GenerationRequest,
    events: UnboundedSender<Result<GenerationEvent>>,
    span: tracing::Span,
}

/// Runs a [`Backend`] on its own thread. Cheap to clone; the thread ends when the last clone
/// is dropped and its current request is done.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    running: Arc<AtomicBool>,
    identity: ModelIdentity,
    tokenizer: Option<Tokenizer>,
    image_support: Option<ImageSupport>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Moves `backend` onto a new thread that serves requests in arrival order.
    pub fn spawn(backend: impl Backend) -> Result<Self> {
        let identity = backend.identity().clone();
        let tokenizer = backend.tokenizer().cloned();
        let image_support = backend.image_support().cloned();
        let (jobs, rx) = mpsc::channel::<Job>();
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        std::thread::Builder::new()
            .name(format!("model-{}", identity.name))
            .spawn(move || {
                let _stopped = SetOnDrop(flag);
                worker(backend, rx);
            })
            .map_err(|e| Error::Internal(format!("cannot start the model thread: {e}")))?;
        Ok(Engine {
            jobs,
            running,
            identity,
            tokenizer,
            image_support,
        })
    }

    /// How the model takes images; `None` for a text-only model.
    pub fn image_support(&self) -> Option<&ImageSupport> {
        self.image_support.as_ref()
    }

    /// Loads a Gemma 3 GGUF model (see [`load_gguf`]) and starts its thread. Blocking; from
    /// async code call it inside `spawn_blocking`.
    pub fn load_gguf(path: impl AsRef<Path>, options: &GgufOptions) -> Result<Self> {
        Self::spawn(load_gguf(path, options)?)
    }

    /// Loads Gemma 3 text from a Hugging Face safetensors checkpoint folder (see
    /// [`load_safetensors`]) and starts its thread. Blocking; from async code call it inside
    /// `spawn_blocking`.
    pub fn load_safetensors(dir: impl AsRef<Path>, options: &SafetensorsOptions) -> Result<Self> {
        Self::spawn(load_safetensors(dir, options)?)
    }

    /// Whether the model thread is alive (for health checks).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The model's identity.
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// The model's tokenizer, if the backend has one locally.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// Generates from `prompt` (raw text; use [`generate_chat`](Self::generate_chat) for
    /// chat). The stream yields [`GenerationEvent::Token`]s as they are produced, then one
    /// [`GenerationEvent::Finished`]; or a single error. Bad parameters and an empty prompt
    /// fail at once; an over-long prompt fails once tokenized. Dropping the stream cancels.
    pub fn generate(&self, prompt: impl Into<String>, params: GenerateParams) -> GenerationStream {
        let prompt = prompt.into();
        if prompt.is_empty() {
            return GenerationStream::failed(Error::invalid("prompt", "must not be empty"));
        }
        self.submit(GenerationRequest {
            prompt,
            messages: None,
            params,
            images: Vec::new(),
        })
    }

    /// Generates from `prompt` with `images`, one per `<start_of_image>` placeholder of the
    /// prompt, for a multimodal model (others refuse images with an `images` error).
    /// Otherwise as [`generate`](Self::generate).
    pub fn generate_with_images(
        &self,
        prompt: impl Into<String>,
        images: Vec<ImageInput>,
        params: GenerateParams,
    ) -> GenerationStream {
        let prompt = prompt.into();
        if prompt.is_empty() {
            return GenerationStream::failed(Error::invalid("prompt", "must not be empty"));
        }
        self.submit(GenerationRequest {
            prompt,
            messages: None,
            params,
            images,
        })
    }

    /// Generates the model's reply to a conversation: the prompt is rendered with
    /// [`chat_prompt`] (whose errors name the message) and the messages travel with it, so
    /// a local backend runs the rendered prompt and a remote chat endpoint receives the
    /// messages. Otherwise as [`generate`](Self::generate).
    pub fn generate_chat(
        &self,
        messages: Vec<ChatMessage>,
        params: GenerateParams,
    ) -> GenerationStream {
        self.generate_chat_with_images(messages, Vec::new(), params)
    }

    /// [`generate_chat`](Self::generate_chat) with images for the messages'
    /// `<start_of_image>` placeholders, in order.
    pub fn generate_chat_with_images(
        &self,
        messages: Vec<ChatMessage>,
        images: Vec<ImageInput>,
        params: GenerateParams,
    ) -> GenerationStream {
        match chat_prompt(&messages) {
            Ok(prompt) => self.submit(GenerationRequest {
                prompt,
                messages: Some(messages),
                params,
                images,
            }),
            Err(e) => GenerationStream::failed(e),
        }
    }

    fn submit(&self, request: GenerationRequest) -> GenerationStream {
        if let Err(e) = request.params.validate() {
            return GenerationStream::failed(e);
        }
        let (events, rx) = unbounded_channel();
        let job = Job {
            request,
            events,
            span: tracing::Span::current(),
        };
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            let _ = job.events.send(Err(Error::Unavailable(
                "the model thread has stopped".into(),
            )));
        }
        GenerationStream { rx }
    }

    /// Generates and collects the whole output text and how it ended.
    pub async fn generate_text(
        &self,
        prompt: impl Into<String>,
        params: GenerateParams,
    ) -> Result<(String, Completion)> {
        use futures::StreamExt as _;
        let mut stream = self.generate(prompt, params);
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            match event? {
                GenerationEvent::Token(t) => text.push_str(&t.text),
                GenerationEvent::Finished(c) => return Ok((text, c)),
            }
        }
        Err(Error::Unavailable(
            "the model thread ended the stream without finishing".into(),
        ))
    }
}

/// Events of one generation. Dropping it cancels the generation.
#[derive(Debug)]
pub struct GenerationStream {
    rx: UnboundedReceiver<Result<GenerationEvent>>,
}

impl GenerationStream {
    /// A stream that yields `error` and ends.
    fn failed(error: Error) -> Self {
        let (events, rx) = unbounded_channel();
        let _ = events.send(Err(error));
        GenerationStream { rx }
    }
}

impl Stream for GenerationStream {
    type Item = Result<GenerationEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

struct ChannelSink<'a> {
    events: &'a UnboundedSender<Result<GenerationEvent>>,
}

impl TokenSink for ChannelSink<'_> {
    fn token(&mut self, token: GeneratedToken) -> bool {
        self.events.send(Ok(GenerationEvent::Token(token))).is_ok()
    }

    fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

/// Clears the running flag when the model thread ends, however it ends.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn worker(mut backend: impl Backend, jobs: mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        let _entered = job.span.enter();
        if job.events.is_closed() {
            continue;
        }
        let started = std::time::Instant::now();
        let mut sink = ChannelSink {
            events: &job.events,
        };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            backend.generate(&job.request, &mut sink)
        }))
        .unwrap_or_else(|_| {
            Err(Error::Internal(
                "the model panicked during generation".into(),
            ))
        });
        match outcome {
            Ok(completion) => {
                tracing::debug!(
                    finish_reason = completion.finish_reason.as_str(),
                    prompt_tokens = completion.usage.prompt_tokens,
                    completion_tokens = completion.usage.completion_tokens,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "generation done"
                );
                if completion.finish_reason != FinishReason::Cancelled {
                    let _ = job.events.send(Ok(GenerationEvent::Finished(completion)));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "generation failed");
                let _ = job.events.send(Err(e));
            }
        }
    }
}
