//! The `openai` backend: generation on a remote OpenAI-compatible `/v1/chat/completions`
//! endpoint (vLLM, TGI, llama.cpp server, Vertex AI), configured by a spec string
//! `openai:URL#MODEL`.
//!
//! The backend sends the request's chat messages (the endpoint applies the model's own chat
//! template), streams the answer as server-sent events and forwards each chunk to the sink as
//! it arrives. A consumer that goes away drops the connection, which is how OpenAI-compatible
//! servers learn to stop generating. Failures before the first token (connection refused, a
//! timeout, HTTP 429 or 5xx, a stream that breaks early) are retried with exponential backoff;
//! after the first token nothing is retried, so output is never duplicated.
//!
//! HTTP runs on a small tokio runtime owned by the backend: the engine's model thread drives
//! each request with `block_on`, and one worker thread runs hyper's connection tasks. Compared
//! with reqwest's `blocking` client (which also runs a runtime on a further thread, and hands
//! every chunk across a channel), this lets every wait (connecting, the response head, the
//! next chunk, a backoff) be raced against a short tick that polls
//! [`TokenSink::is_cancelled`], so a cancelled request drops its connection within the tick
//! even while the endpoint is silent (queued, or prefilling). The worker is needed: a
//! current-thread runtime runs spawned tasks only inside `block_on`, so the connection task
//! would not see a dropped response, and would keep the socket (and the remote generation)
//! open, until the next request.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::backend::{
    Backend, Completion, FinishReason, GeneratedToken, GenerationRequest, TokenSink, Usage,
};
use crate::chat::{ChatMessage, Role};
use crate::error::{Error, Result};
use crate::identity::{BackendKind, ModelIdentity};
use crate::params::GenerateParams;
use crate::sampling::fresh_seed;
use crate::tokenizer::Tokenizer;

/// The environment variable holding the endpoint's API key (sent as a bearer token; never
/// logged, never part of an error).
pub const OPENAI_API_KEY_ENV: &str = "CHARTLINE_OPENAI_API_KEY";

/// The prefix of an `openai` backend spec: `openai:URL#MODEL`.
pub const OPENAI_SPEC_PREFIX: &str = "openai:";

/// The token id reported for a token whose id the endpoint did not send. OpenAI-compatible
/// servers stream text, not ids; Chartline's own face
/// ([`openai_server`](crate::openai_server)) adds them as `choices[].token_ids`, as vLLM does
/// when asked.
pub const UNKNOWN_TOKEN_ID: u32 = u32::MAX;

/// The largest server-sent event the backend buffers.
const MAX_EVENT_BYTES: usize = 4 << 20;

/// The most of an error response's body the backend reads.
const MAX_ERROR_BYTES: usize = 64 << 10;

/// How often a silent wait checks whether the consumer went away.
const CANCEL_TICK: Duration = Duration::from_millis(50);

/// How the backend talks to its endpoint.
#[derive(Clone)]
pub struct OpenAiOptions {
    /// Limit on establishing a TCP connection.
    pub connect_timeout: Duration,
    /// Limit on each wait for data: the response head, then every chunk of the stream. It
    /// must cover the endpoint's queueing and prompt processing (time to first token).
    pub read_timeout: Duration,
    /// Retries after the first attempt, only while no token has been delivered.
    pub max_retries: u32,
    /// The wait before the first retry; doubled for each further one.
    pub retry_backoff: Duration,
    /// The context length reported in the model's identity, which Chartline budgets prompts
    /// against. The endpoint enforces its own limit (an over-long request comes back as
    /// [`InvalidArgument`](crate::ErrorCategory::InvalidArgument)).
    pub context_length: usize,
    /// Bearer token for the endpoint; see [`OpenAiOptions::from_env`].
    pub api_key: Option<String>,
}

impl Default for OpenAiOptions {
    fn default() -> Self {
        OpenAiOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(120),
            max_retries: 2,
            retry_backoff: Duration::from_millis(250),
            context_length: 8192,
            api_key: None,
        }
    }
}

impl OpenAiOptions {
    /// The defaults, with the API key from [`OPENAI_API_KEY_ENV`] when it is set and not
    /// empty.
    pub fn from_env() -> Self {
        OpenAiOptions {
            api_key: std::env::var(OPENAI_API_KEY_ENV)
                .ok()
                .filter(|k| !k.trim().is_empty()),
            ..Self::default()
        }
    }
}

impl fmt::Debug for OpenAiOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("context_length", &self.context_length)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A [`Backend`] on a remote OpenAI-compatible chat completions endpoint.
///
/// Its [`ModelIdentity`] names the remote model, with `weights_sha256` and
/// `tokenizer_sha256` both `remote:` followed by the sha256 of `URL#MODEL`. The weights
/// behind a remote endpoint cannot be pinned from here: the identity pins which endpoint and
/// which model name produced an output, not the bytes that served it. There is no local
/// tokenizer.
///
/// It generates only from chat messages ([`Engine::generate_chat`](crate::Engine::generate_chat)):
/// a raw prompt is already templated for a local model and cannot be sent to a chat
/// endpoint. Only `http://` URLs are accepted: the workspace builds reqwest without TLS, so
/// reach an `https://` endpoint (Vertex AI) through a TLS-terminating proxy.
pub struct OpenAiBackend {
    remote: Remote,
    identity: ModelIdentity,
    // Built on first use, on the model thread, so that building or dropping an unused backend
    // from async code never creates or drops a runtime there.
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("url", &self.remote.shown_url)
            .field("model", &self.remote.model)
            .finish_non_exhaustive()
    }
}

/// Everything one request needs, apart from the runtime.
struct Remote {
    client: reqwest::Client,
    endpoint: Url,
    shown_url: String,
    model: String,
    auth: Option<HeaderValue>,
    max_retries: u32,
    retry_backoff: Duration,
}

impl OpenAiBackend {
    /// A backend from a spec `openai:URL#MODEL`, e.g.
    /// `openai:http://10.0.0.5:8000/v1#google/medgemma-27b-it`. `URL` is the API base (what
    /// OpenAI clients call `base_url`, usually ending in `/v1`; `/chat/completions` is
    /// appended unless already there) and `MODEL` the endpoint's model name. Errors name the
    /// part at fault: `spec`, `spec.url` or `spec.model`. Connects to nothing.
    pub fn from_spec(spec: &str, options: OpenAiOptions) -> Result<Self> {
        let rest = spec
            .trim()
            .strip_prefix(OPENAI_SPEC_PREFIX)
            .ok_or_else(|| {
                Error::invalid(
                    "spec",
                    format!("must start with {OPENAI_SPEC_PREFIX:?} (openai:URL#MODEL)"),
                )
            })?;
        let (url, model) = rest.split_once('#').ok_or_else(|| {
            Error::invalid(
                "spec.model",
                "is missing: give it after '#' (openai:URL#MODEL)",
            )
        })?;
        Self::new(url, model, options)
    }

    /// A backend for `model` at the API base `url` (see [`OpenAiBackend::from_spec`]).
    pub fn new(url: &str, model: &str, options: OpenAiOptions) -> Result<Self> {
        let model = model.trim();
        if model.is_empty() {
            return Err(Error::invalid(
                "spec.model",
                "must not be empty (openai:URL#MODEL)",
            ));
        }
        let (endpoint, shown_url) = parse_base_url(url.trim())?;
        let auth = match &options.api_key {
            None => None,
            Some(key) => {
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {}", key.trim())).map_err(|_| {
                        Error::invalid(
                            OPENAI_API_KEY_ENV,
                            "must be printable ASCII without line breaks",
                        )
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let client = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .build()
            .map_err(|e| {
                Error::Internal(format!("cannot build the HTTP client: {}", cause_of(&e)))
            })?;
        let hash = format!(
            "remote:{}",
            hex::encode(Sha256::digest(format!("{}#{model}", url.trim())))
        );
        let identity = ModelIdentity {
            name: model.to_owned(),
            backend: BackendKind::OpenAi,
            weights_sha256: hash.clone(),
            tokenizer_sha256: hash,
            context_length: options.context_length,
        };
        Ok(OpenAiBackend {
            remote: Remote {
                client,
                endpoint,
                shown_url,
                model: model.to_owned(),
                auth,
                max_retries: options.max_retries,
                retry_backoff: options.retry_backoff,
            },
            identity,
            runtime: None,
        })
    }

    /// The API base URL as shown in errors (no credentials, no query).
    pub fn url(&self) -> &str {
        &self.remote.shown_url
    }
}

/// The chat completions URL for an API base, and the base as errors may show it.
fn parse_base_url(url: &str) -> Result<(Url, String)> {
    if url.is_empty() {
        return Err(Error::invalid(
            "spec.url",
            "must not be empty (openai:URL#MODEL)",
        ));
    }
    let mut parsed = Url::parse(url)
        .map_err(|e| Error::invalid("spec.url", format!("is not a valid URL ({e})")))?;
    match parsed.scheme() {
        "http" => {}
        "https" => {
            return Err(Error::invalid(
                "spec.url",
                "must be http://: this build has no TLS; put a TLS-terminating proxy in front \
                 of an https endpoint",
            ));
        }
        other => {
            return Err(Error::invalid(
                "spec.url",
                format!("must be an http:// URL (got scheme {other:?})"),
            ));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid("spec.url", "must name a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(Error::invalid(
            "spec.url",
            format!("must not carry credentials; set {OPENAI_API_KEY_ENV} instead"),
        ));
    }
    let path = parsed.path().trim_end_matches('/').to_owned();
    let shown = format!("{}{path}", parsed.origin().ascii_serialization());
    if !path.ends_with("/chat/completions") {
        parsed.set_path(&format!("{path}/chat/completions"));
    }
    Ok((parsed, shown))
}

impl Backend for OpenAiBackend {
    fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        None
    }

    /// Runs one streamed chat completion. Blocks the calling thread (the engine's model
    /// thread); calling it from inside an async runtime panics.
    fn generate(
        &mut self,
        request: &GenerationRequest,
        sink: &mut dyn TokenSink,
    ) -> Result<Completion> {
        if !request.images.is_empty() {
            // Not yet: a remote engine would need the images re-encoded (DICOM is not an
            // OpenAI image type) as data: URLs in the message parts.
            return Err(Error::invalid(
                "images",
                "the openai backend does not send images to the remote engine (yet)",
            ));
        }
        let messages = request.messages.as_deref().ok_or_else(|| {
            Error::invalid(
                "messages",
                "are required by the openai backend (Engine::generate_chat): a raw prompt \
                 cannot be sent to a chat endpoint",
            )
        })?;
        let params = &request.params;
        let seed = (!params.is_greedy()).then(|| params.seed.unwrap_or_else(fresh_seed));
        let body = request_body(&self.remote.model, messages, params, seed);
        if self.runtime.is_none() {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("openai-http")
                .enable_all()
                .build()
                .map_err(|e| Error::Internal(format!("cannot start the HTTP runtime: {e}")))?;
            self.runtime = Some(runtime);
        }
        let Some(runtime) = self.runtime.as_ref() else {
            return Err(Error::Internal("the HTTP runtime is missing".into()));
        };
        let outcome = runtime.block_on(self.remote.run(&body, sink))?;
        Ok(Completion {
            usage: outcome.usage,
            finish_reason: outcome.finish_reason,
            model: self.identity.clone(),
            seed,
        })
    }
}

/// The JSON body of a streamed chat completion request. Greedy decoding is temperature 0;
/// `top_k` and `repetition_penalty` (not OpenAI parameters, but vLLM, TGI and llama.cpp take
/// them) are sent only when they are not off.
fn request_body(
    model: &str,
    messages: &[ChatMessage],
    params: &GenerateParams,
    seed: Option<u64>,
) -> Value {
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| {
            let role = match m.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            json!({"role": role, "content": m.content})
        })
        .collect();
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": params.max_tokens,
        "temperature": decimal(params.temperature),
        "top_p": decimal(params.top_p),
    });
    if let Some(seed) = seed.or(params.seed) {
        body["seed"] = json!(seed);
    }
    if !params.stop.is_empty() {
        body["stop"] = json!(params.stop);
    }
    if params.top_k > 0 {
        body["top_k"] = json!(params.top_k);
    }
    if params.repetition_penalty != 1.0 {
        body["repetition_penalty"] = decimal(params.repetition_penalty);
    }
    body
}

/// An `f32` as the decimal a person wrote (0.7, not 0.699999988079071).
fn decimal(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// How a remote generation ended.
struct Outcome {
    usage: Usage,
    finish_reason: FinishReason,
}

/// What one attempt came to.
enum Attempt {
    /// The request is over: finished, cancelled, or failed in a way retrying cannot help (or
    /// may not, because tokens were delivered).
    Done(Result<Outcome>),
    /// Failed before any token; the cause, for the error if retries run out.
    Retry(String),
}

impl Remote {
    async fn run(&self, body: &Value, sink: &mut dyn TokenSink) -> Result<Outcome> {
        let mut attempt = 0u32;
        loop {
            match self.attempt(body, sink).await {
                Attempt::Done(outcome) => return outcome,
                Attempt::Retry(cause) => {
                    if attempt >= self.max_retries {
                        return Err(Error::Unavailable(format!(
                            "the openai endpoint {} failed {} attempt(s): {cause}",
                            self.shown_url,
                            attempt + 1
                        )));
                    }
                    let backoff = self
                        .retry_backoff
                        .saturating_mul(2u32.saturating_pow(attempt));
                    tracing::debug!(
                        url = %self.shown_url,
                        attempt = attempt + 1,
                        backoff_ms = backoff.as_millis() as u64,
                        cause = %cause,
                        "openai endpoint failed before the first token; retrying"
                    );
                    if unless_cancelled(tokio::time::sleep(backoff), sink)
                        .await
                        .is_none()
                    {
                        return Ok(cancelled(Usage::default()));
                    }
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, body: &Value, sink: &mut dyn TokenSink) -> Attempt {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(ACCEPT, "text/event-stream")
            .json(body);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = match unless_cancelled(request.send(), sink).await {
            None => return Attempt::Done(Ok(cancelled(Usage::default()))),
            Some(Err(e)) => return Attempt::Retry(cause_of(&e)),
            Some(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let Some(body) = unless_cancelled(error_body(response), sink).await else {
                return Attempt::Done(Ok(cancelled(Usage::default())));
            };
            return self.refused(status, &body);
        }
        let is_sse = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            return Attempt::Done(Err(Error::Internal(format!(
                "the openai endpoint {} answered without an event stream",
                self.shown_url
            ))));
        }
        // Dropping `chunks` (on any return below) closes the connection, which is what stops
        // the remote generation when the consumer goes away.
        let mut chunks = response.bytes_stream();
        let mut parser = SseParser::default();
        let mut state = StreamState::default();
        let mut payloads = Vec::new();
        loop {
            let next = match unless_cancelled(chunks.next(), sink).await {
                None => return Attempt::Done(Ok(cancelled(state.usage()))),
                Some(next) => next,
            };
            let bytes = match next {
                Some(Ok(bytes)) => bytes,
                Some(Err(e)) => return self.broken(&state, &cause_of(&e)),
                None if state.finish.is_some() => return Attempt::Done(Ok(state.outcome())),
                None => return self.broken(&state, "the stream ended before [DONE]"),
            };
            if parser.push(&bytes, &mut payloads).is_err() {
                return Attempt::Done(Err(self.malformed("an over-long or non-UTF-8 event")));
            }
            for payload in payloads.drain(..) {
                if payload.trim() == "[DONE]" {
                    return Attempt::Done(Ok(state.outcome()));
                }
                let chunk: Chunk = match serde_json::from_str(&payload) {
                    Ok(chunk) => chunk,
                    // The serde message is not kept: it can quote generated text.
                    Err(_) => return Attempt::Done(Err(self.malformed("an unparsable chunk"))),
                };
                if let Some(error) = chunk.error {
                    let cause = format!("an error event ({})", error.describe());
                    return self.broken(&state, &cause);
                }
                if let Some(usage) = chunk.usage {
                    state.reported = Some(usage);
                }
                for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
                    if let Some(reason) = choice.finish_reason() {
                        state.finish = Some(reason);
                    }
                    let text = choice.delta.and_then(|d| d.content).unwrap_or_default();
                    let ids = choice.token_ids.unwrap_or_default();
                    let tokens: Vec<GeneratedToken> = if ids.is_empty() {
                        if text.is_empty() {
                            Vec::new()
                        } else {
                            vec![GeneratedToken {
                                id: UNKNOWN_TOKEN_ID,
                                text,
                            }]
                        }
                    } else {
                        let mut text = Some(text);
                        ids.into_iter()
                            .map(|id| GeneratedToken {
                                id,
                                text: text.take().unwrap_or_default(),
                            })
                            .collect()
                    };
                    for token in tokens {
                        state.delivered += 1;
                        if !sink.token(token) {
                            return Attempt::Done(Ok(cancelled(state.usage())));
                        }
                    }
                }
            }
        }
    }

    /// A non-success HTTP status: retried when the endpoint may recover (429, 5xx, 408),
    /// the request's fault for 400/413/422, else unavailable. The endpoint's error message
    /// is not kept (it can quote the prompt); its `type`, `code` and `param` are.
    fn refused(&self, status: StatusCode, body: &[u8]) -> Attempt {
        let detail = serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .and_then(|b| b.error)
            .unwrap_or_default();
        let code = status.as_u16();
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            return Attempt::Retry(format!("HTTP {code} ({})", detail.describe()));
        }
        let url = &self.shown_url;
        let error = match code {
            400 | 413 | 422 => Error::invalid(
                detail.field().unwrap_or("request"),
                format!(
                    "was rejected by the openai endpoint {url} (HTTP {code}, {})",
                    detail.describe()
                ),
            ),
            401 | 403 => Error::Unavailable(format!(
                "the openai endpoint {url} refused the credentials (HTTP {code}); check \
                 {OPENAI_API_KEY_ENV}"
            )),
            404 => Error::Unavailable(format!(
                "the openai endpoint {url} answered HTTP 404: no chat completions route, or \
                 no model {:?} ({})",
                self.model,
                detail.describe()
            )),
            _ => Error::Unavailable(format!(
                "the openai endpoint {url} answered HTTP {code} ({})",
                detail.describe()
            )),
        };
        Attempt::Done(Err(error))
    }

    /// A stream that failed: retried when nothing was delivered, an error otherwise.
    fn broken(&self, state: &StreamState, cause: &str) -> Attempt {
        if state.delivered == 0 {
            return Attempt::Retry(cause.to_owned());
        }
        Attempt::Done(Err(Error::Unavailable(format!(
            "the openai endpoint {} broke off after {} token(s): {cause}",
            self.shown_url, state.delivered
        ))))
    }

    fn malformed(&self, what: &str) -> Error {
        Error::Internal(format!(
            "the openai endpoint {} sent {what}",
            self.shown_url
        ))
    }
}

fn cancelled(usage: Usage) -> Outcome {
    Outcome {
        usage,
        finish_reason: FinishReason::Cancelled,
    }
}

/// The start of an error response's body (enough for its `error` object), at most
/// [`MAX_ERROR_BYTES`]; what cannot be read is left out.
async fn error_body(response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(Ok(bytes)) = chunks.next().await {
        body.extend_from_slice(&bytes);
        if body.len() >= MAX_ERROR_BYTES {
            break;
        }
    }
    body
}

/// Runs `future` to completion unless the consumer goes away first (`None`), checking every
/// [`CANCEL_TICK`].
async fn unless_cancelled<F: Future>(future: F, sink: &dyn TokenSink) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    loop {
        if sink.is_cancelled() {
            return None;
        }
        if let Ok(output) = tokio::time::timeout(CANCEL_TICK, &mut future).await {
            return Some(output);
        }
    }
}

/// A reqwest error and its causes, without the URL (errors show the URL themselves, without
/// credentials or query).
fn cause_of(error: &reqwest::Error) -> String {
    let mut out = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// What the stream has said so far.
#[derive(Default)]
struct StreamState {
    delivered: usize,
    finish: Option<FinishReason>,
    reported: Option<WireUsage>,
}

impl StreamState {
    /// The endpoint's token counts where it reported them (`stream_options.include_usage`),
    /// else the tokens delivered.
    fn usage(&self) -> Usage {
        match &self.reported {
            Some(u) => Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            },
            None => Usage {
                prompt_tokens: 0,
                completion_tokens: self.delivered,
            },
        }
    }

    fn outcome(&self) -> Outcome {
        Outcome {
            usage: self.usage(),
            finish_reason: self.finish.unwrap_or(FinishReason::Stop),
        }
    }
}

/// One `chat.completion.chunk` (only what the backend reads).
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
    /// vLLM: the stop string (or end token id) that ended generation.
    #[serde(default)]
    stop_reason: Option<Value>,
    /// Chartline's face: the exact [`FinishReason`].
    #[serde(default)]
    chartline_finish_reason: Option<String>,
    /// vLLM (`return_token_ids`) and Chartline's face: the ids of this chunk's tokens.
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
}

impl ChunkChoice {
    fn finish_reason(&self) -> Option<FinishReason> {
        let exact = match self.chartline_finish_reason.as_deref() {
            Some("stop") => Some(FinishReason::Stop),
            Some("length") => Some(FinishReason::Length),
            Some("stop_sequence") => Some(FinishReason::StopSequence),
            _ => None,
        };
        if exact.is_some() {
            return exact;
        }
        Some(match self.finish_reason.as_deref()? {
            "length" => FinishReason::Length,
            "stop_sequence" => FinishReason::StopSequence,
            "stop" if matches!(self.stop_reason, Some(Value::String(_))) => {
                FinishReason::StopSequence
            }
            _ => FinishReason::Stop,
        })
    }
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: usize,
    #[serde(default)]
    completion_tokens: usize,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Option<WireError>,
}

/// An OpenAI-style error object. Its `message` is never read: it can quote the prompt.
#[derive(Default, Deserialize)]
struct WireError {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    param: Option<String>,
}

impl WireError {
    /// `type`, `code` and `param` where they look like identifiers.
    fn describe(&self) -> String {
        let code = match &self.code {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let parts: Vec<String> = [
            ("type", self.kind.clone()),
            ("code", code),
            ("param", self.param.clone()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.filter(|v| is_identifier(v)).map(|v| format!("{k} {v}")))
        .collect();
        if parts.is_empty() {
            "no error details".to_owned()
        } else {
            parts.join(", ")
        }
    }

    fn field(&self) -> Option<&str> {
        self.param.as_deref().filter(|p| is_identifier(p))
    }
}

/// Short, and made of characters field names and error codes use.
fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'))
}

/// Splits a server-sent event stream into the `data` of each event.
#[derive(Default)]
struct SseParser {
    pending: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Takes the next bytes and appends the data of every event they complete to `out`.
    /// Fails on an event over [`MAX_EVENT_BYTES`] or a line that is not UTF-8.
    fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) -> std::result::Result<(), ()> {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(end) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let line = &self.pending[start..start + end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line).map_err(|_| ())?;
            if line.is_empty() {
                if self.has_data {
                    out.push(std::mem::take(&mut self.data));
                    self.has_data = false;
                }
            } else if !line.starts_with(':') {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                if field == "data" {
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    self.has_data = true;
                }
            }
            start += end + 1;
        }
        self.pending.drain(..start);
        if self.pending.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(spec: &str) -> Option<String> {
        OpenAiBackend::from_spec(spec, OpenAiOptions::default())
            .err()
            .and_then(|e| e.field().map(str::to_owned))
    }

    #[test]
    fn spec_parts_become_endpoint_and_identity() {
        let b = OpenAiBackend::from_spec(
            "openai:http://10.0.0.5:8000/v1/#google/medgemma-27b-it",
            OpenAiOptions::default(),
        );
        let Ok(b) = b else {
            panic!("a good spec parses: {b:?}");
        };
        assert_eq!(
            b.remote.endpoint.as_str(),
            "http://10.0.0.5:8000/v1/chat/completions"
        );
        assert_eq!(b.url(), "http://10.0.0.5:8000/v1");
        let id = b.identity();
        assert_eq!(id.name, "google/medgemma-27b-it");
        assert_eq!(id.backend, BackendKind::OpenAi);
        let expected = hex::encode(Sha256::digest(
            "http://10.0.0.5:8000/v1/#google/medgemma-27b-it",
        ));
        assert_eq!(id.weights_sha256, format!("remote:{expected}"));
        assert_eq!(id.tokenizer_sha256, id.weights_sha256);
        assert!(b.tokenizer().is_none(), "no local tokenizer");
    }

    #[test]
    fn a_full_chat_completions_url_is_kept() {
        let b = OpenAiBackend::new(
            "http://h:1/v1/chat/completions",
            "m",
            OpenAiOptions::default(),
        );
        assert_eq!(
            b.ok().map(|b| b.remote.endpoint.to_string()).as_deref(),
            Some("http://h:1/v1/chat/completions")
        );
    }

    #[test]
    fn bad_specs_name_the_part_at_fault() {
        assert_eq!(field_of("gguf:/models/x.gguf").as_deref(), Some("spec"));
        assert_eq!(
            field_of("openai:http://h:1/v1").as_deref(),
            Some("spec.model")
        );
        assert_eq!(
            field_of("openai:http://h:1/v1#  ").as_deref(),
            Some("spec.model")
        );
        assert_eq!(field_of("openai:#m").as_deref(), Some("spec.url"));
        assert_eq!(field_of("openai:ftp://h/v1#m").as_deref(), Some("spec.url"));
        assert_eq!(
            field_of("openai:https://h/v1#m").as_deref(),
            Some("spec.url")
        );
        assert_eq!(field_of("openai:h:1/v1#m").as_deref(), Some("spec.url"));
        assert_eq!(
            field_of("openai:http://u:p@h/v1#m").as_deref(),
            Some("spec.url")
        );
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        let options = OpenAiOptions {
            api_key: Some("sk-secret".into()),
            ..Default::default()
        };
        assert!(!format!("{options:?}").contains("sk-secret"));
        let b = OpenAiBackend::from_spec("openai:http://h:1/v1#m", options);
        assert!(!format!("{b:?}").contains("sk-secret"));
    }

    #[test]
    fn greedy_requests_send_temperature_zero_and_the_set_parameters() {
        let params = GenerateParams {
            stop: vec!["\n\n".into()],
            ..GenerateParams::greedy(7)
        };
        let body = request_body("m", &[ChatMessage::user("hi")], &params, None);
        assert_eq!(body["temperature"], json!(0.0));
        assert_eq!(body["top_p"], json!(1.0));
        assert_eq!(body["max_tokens"], json!(7));
        assert_eq!(body["stop"], json!(["\n\n"]));
        assert_eq!(body["stream"], json!(true));
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
        assert!(body.get("seed").is_none() && body.get("top_k").is_none());

        let params = GenerateParams {
            temperature: 0.7,
            top_k: 40,
            ..GenerateParams::greedy(7)
        };
        let body = request_body("m", &[ChatMessage::user("hi")], &params, Some(5));
        assert_eq!(body["temperature"], json!(0.7), "sent as written");
        assert_eq!(body["seed"], json!(5));
        assert_eq!(body["top_k"], json!(40));
    }

    #[test]
    fn sse_events_are_split_across_chunks_and_comments_skipped() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        assert!(p.push(b": keep-alive\n\nda", &mut out).is_ok());
        assert!(out.is_empty());
        assert!(
            p.push(b"ta: {\"a\":1}\r\n\r\ndata:[DONE]\n", &mut out)
                .is_ok()
        );
        assert_eq!(out, vec!["{\"a\":1}".to_owned()]);
        assert!(p.push(b"\n", &mut out).is_ok());
        assert_eq!(out.last().map(String::as_str), Some("[DONE]"));
        let mut p = SseParser::default();
        assert!(p.push(b"data: a\ndata: b\n\n", &mut out).is_ok());
        assert_eq!(
            out.last().map(String::as_str),
            Some("a\nb"),
            "multi-line data"
        );
    }

    #[test]
    fn finish_reasons_map_from_each_server_dialect() {
        let choice = |v: Value| serde_json::from_value::<ChunkChoice>(v).ok();
        let reason = |v: Value| choice(v).and_then(|c| c.finish_reason());
        assert_eq!(
            reason(json!({"finish_reason": "stop"})),
            Some(FinishReason::Stop)
        );
        assert_eq!(
            reason(json!({"finish_reason": "length"})),
            Some(FinishReason::Length)
        );
        assert_eq!(
            reason(json!({"finish_reason": "stop", "stop_reason": "###"})),
            Some(FinishReason::StopSequence),
            "vLLM names the stop string"
        );
        assert_eq!(
            reason(json!({"finish_reason": "stop", "stop_reason": 106})),
            Some(FinishReason::Stop),
            "vLLM names an end token by id"
        );
        assert_eq!(
            reason(json!({"finish_reason": "stop", "chartline_finish_reason": "stop_sequence"})),
            Some(FinishReason::StopSequence)
        );
        assert_eq!(reason(json!({"finish_reason": null})), None);
    }

    #[test]
    fn remote_error_details_keep_identifiers_not_messages() {
        let e: WireError = serde_json::from_value(json!({
            "message": "patient Jane Doe ...", "type": "invalid_request_error",
            "param": "messages", "code": null
        }))
        .unwrap_or_default();
        let d = e.describe();
        assert_eq!(d, "type invalid_request_error, param messages");
        let e: WireError =
            serde_json::from_value(json!({"param": "not an identifier: Jane"})).unwrap_or_default();
        assert_eq!(e.field(), None);
    }
}
