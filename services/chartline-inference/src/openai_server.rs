//! An OpenAI-compatible HTTP face on Chartline's engine: `POST /v1/chat/completions`
//! (streamed as server-sent events or answered as one JSON object) and `GET /v1/models`.
//!
//! Operators can point OpenAI clients at Chartline, and the [`OpenAiBackend`](crate::OpenAiBackend)
//! has a real peer to test against. The request JSON becomes validated [`ChatMessage`]s and
//! [`GenerateParams`] once, here; a bad request is HTTP 400 with an OpenAI-style error
//! (`{"error": {"message", "type": "invalid_request_error", "param", "code"}}`) whose `param`
//! names the field. Error messages never quote message text.
//!
//! Differences from OpenAI's API: `temperature` 0 is greedy decoding (bit-reproducible);
//! `top_k` and `repetition_penalty` are accepted (as vLLM does); `n` must be 1; logprobs,
//! tools, non-text content and response formats are refused; without `max_tokens` at most
//! [`GenerateParams::default`]'s 256 tokens are generated. Each choice carries two extensions
//! clients ignore: `token_ids` (the ids of the chunk's tokens, as vLLM's `return_token_ids`)
//! and `chartline_finish_reason` (`stop`, `length` or `stop_sequence`, which OpenAI's
//! `finish_reason` folds into `stop`). `system_fingerprint` is the served weights' sha256.
//! Dropping the connection cancels the generation at the next token.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{StreamExt, stream};
use serde_json::{Map, Value, json};

use crate::grpc::Models;
use crate::params::check_context;
use crate::sampling::fresh_seed;
use crate::{
    ChatMessage, Completion, Engine, Error, ErrorCategory, FinishReason, GenerateParams,
    GenerationEvent, Role, chat_prompt,
};

/// The router: `POST /v1/chat/completions` and `GET /v1/models` over `models`. Both answer
/// 503 until the engine is installed.
pub fn router(models: Models) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .with_state(models)
}

/// An OpenAI-style error response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        let param = param.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: format!("{param} {reason}"),
            param: Some(param),
            code: None,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// The one mapping of engine errors to HTTP. The engine names the rendered `prompt`, which a
/// client of this face sent as `messages`.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e.category() {
            ErrorCategory::InvalidArgument => {
                let field = match e.field() {
                    Some("prompt") | None => "messages".to_owned(),
                    Some(field) => field.to_owned(),
                };
                let message = match &e {
                    Error::InvalidArgument { reason, .. } => format!("{field} {reason}"),
                    other => other.to_string(),
                };
                ApiError {
                    status: StatusCode::BAD_REQUEST,
                    kind: "invalid_request_error",
                    message,
                    param: Some(field),
                    code: None,
                }
            }
            ErrorCategory::NotFound | ErrorCategory::Internal => {
                tracing::error!(error = %e, "inference failure");
                ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    kind: "server_error",
                    message: "inference failure".into(),
                    param: None,
                    code: None,
                }
            }
            ErrorCategory::Unavailable => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                message: e.to_string(),
                param: None,
                code: Some("unavailable"),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

fn loading() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        message: "the model is still loading".into(),
        param: None,
        code: Some("unavailable"),
    }
}

async fn list_models(State(models): State<Models>) -> Result<Response, ApiError> {
    let engine = models.engine().ok_or_else(loading)?;
    let id = engine.identity();
    Ok(axum::Json(json!({
        "object": "list",
        "data": [{
            "id": id.name,
            "object": "model",
            "created": 0,
            "owned_by": "chartline",
            "max_model_len": id.context_length,
        }],
    }))
    .into_response())
}

/// A chat completion request after validation.
#[derive(Debug)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    params: GenerateParams,
    stream: bool,
    include_usage: bool,
}

async fn chat_completions(State(models): State<Models>, body: Bytes) -> Response {
    match answer(&models, &body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn answer(models: &Models, body: &[u8]) -> Result<Response, ApiError> {
    let engine = models.engine().ok_or_else(loading)?;
    // Syntax errors from serde_json name a line and column, never a value.
    let json: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("is not JSON: {e}")))?;
    let request = parse_request(&json, engine)?;
    let meta = Meta {
        id: format!("chatcmpl-{:016x}", fresh_seed()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: engine.identity().name.clone(),
        fingerprint: engine.identity().weights_sha256.clone(),
    };
    if request.stream {
        stream_answer(engine, request, meta)
    } else {
        whole_answer(engine, request, meta).await
    }
}

/// What every response object repeats.
#[derive(Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

async fn whole_answer(
    engine: &Engine,
    request: ChatRequest,
    meta: Meta,
) -> Result<Response, ApiError> {
    let mut events = engine.generate_chat(request.messages, request.params);
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(event) = events.next().await {
        match event? {
            GenerationEvent::Token(t) => {
                text.push_str(&t.text);
                ids.push(t.id);
            }
            GenerationEvent::Finished(c) => {
                return Ok(axum::Json(json!({
                    "id": meta.id,
                    "object": "chat.completion",
                    "created": meta.created,
                    "model": meta.model,
                    "system_fingerprint": meta.fingerprint,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": openai_finish_reason(c.finish_reason),
                        "chartline_finish_reason": c.finish_reason.as_str(),
                        "token_ids": ids,
                    }],
                    "usage": usage(&c),
                }))
                .into_response());
            }
        }
    }
    Err(Error::Unavailable("the model thread ended the stream without finishing".into()).into())
}

fn stream_answer(engine: &Engine, request: ChatRequest, meta: Meta) -> Result<Response, ApiError> {
    // The response head goes out before the first token (prefill can take a while), so the
    // request errors the engine would find later are found here, where they can still be
    // a 400.
    if let Some(tokenizer) = engine.tokenizer() {
        let prompt = chat_prompt(&request.messages)?;
        let prompt_tokens = tokenizer.encode(&prompt, true)?.len();
        check_context(
            prompt_tokens,
            request.params.max_tokens,
            engine.identity().context_length,
        )?;
    }
    let events = engine.generate_chat(request.messages, request.params);
    let include_usage = request.include_usage;
    let head = chunk(
        &meta,
        json!({"role": "assistant", "content": ""}),
        None,
        &[],
    );
    let body = stream::iter([data(&head)]).chain(events.flat_map(move |event| {
        let out: Vec<Event> = match event {
            Ok(GenerationEvent::Token(t)) => {
                vec![data(&chunk(
                    &meta,
                    json!({"content": t.text}),
                    None,
                    &[t.id],
                ))]
            }
            Ok(GenerationEvent::Finished(c)) => {
                let mut out = vec![data(&chunk(&meta, json!({}), Some(c.finish_reason), &[]))];
                if include_usage {
                    out.push(data(&json!({
                        "id": meta.id,
                        "object": "chat.completion.chunk",
                        "created": meta.created,
                        "model": meta.model,
                        "system_fingerprint": meta.fingerprint,
                        "choices": [],
                        "usage": usage(&c),
                    })));
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
            Err(e) => vec![
                data(&ApiError::from(e).body()),
                Event::default().data("[DONE]"),
            ],
        };
        stream::iter(out)
    }));
    let body = body.map(Ok::<Event, Infallible>);
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

fn chunk(meta: &Meta, delta: Value, finish: Option<FinishReason>, ids: &[u32]) -> Value {
    let mut choice = json!({
        "index": 0,
        "delta": delta,
        "logprobs": null,
        "finish_reason": finish.map(openai_finish_reason),
    });
    if let Some(reason) = finish {
        choice["chartline_finish_reason"] = json!(reason.as_str());
    }
    if !ids.is_empty() {
        choice["token_ids"] = json!(ids);
    }
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "choices": [choice],
    })
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.usage.prompt_tokens,
        "completion_tokens": c.usage.completion_tokens,
        "total_tokens": c.usage.prompt_tokens + c.usage.completion_tokens,
    })
}

/// OpenAI's `finish_reason`: a stop sequence is `stop`, as an end token is.
fn openai_finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::StopSequence | FinishReason::Cancelled => "stop",
    }
}

/// The request JSON to validated messages and parameters; the first bad field is named.
fn parse_request(json: &Value, engine: &Engine) -> Result<ChatRequest, ApiError> {
    let obj = json
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "must be a JSON object"))?;

    let model = string(obj, "model")?.ok_or_else(|| ApiError::invalid("model", "is required"))?;
    let id = engine.identity();
    if model != id.name && model != id.weights_sha256 {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(
                "model",
                format!("names an unknown model; this server serves {:?}", id.name),
            )
        });
    }

    let messages = messages(obj)?;

    if let Some(n) = uint(obj, "n")?
        && n != 1
    {
        return Err(ApiError::invalid("n", format!("must be 1 (got {n})")));
    }
    for name in ["presence_penalty", "frequency_penalty"] {
        if let Some(x) = number(obj, name)?
            && x != 0.0
        {
            return Err(ApiError::invalid(name, "is not supported (must be 0)"));
        }
    }
    if boolean(obj, "logprobs")? == Some(true) {
        return Err(ApiError::invalid("logprobs", "is not supported"));
    }
    if present(obj, "tools").is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(ApiError::invalid("tools", "are not supported"));
    }
    if let Some(format) = present(obj, "response_format") {
        let kind = format.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(ApiError::invalid(
                "response_format.type",
                "must be text (structured output is not supported)",
            ));
        }
    }

    let defaults = GenerateParams::default();
    let max_tokens = match uint(obj, "max_completion_tokens")? {
        Some(n) => Some(("max_completion_tokens", n)),
        None => uint(obj, "max_tokens")?.map(|n| ("max_tokens", n)),
    };
    let max_tokens = match max_tokens {
        None => defaults.max_tokens,
        Some((name, n)) => u32::try_from(n)
            .map_err(|_| ApiError::invalid(name, format!("must be at most {}", u32::MAX)))?,
    };
    let params = GenerateParams {
        max_tokens,
        // OpenAI's default temperature is 1; 0 is greedy.
        temperature: float(obj, "temperature")?.unwrap_or(1.0),
        top_p: float(obj, "top_p")?.unwrap_or(1.0),
        top_k: match uint(obj, "top_k")? {
            None => 0,
            Some(k) => u32::try_from(k).unwrap_or(u32::MAX),
        },
        repetition_penalty: float(obj, "repetition_penalty")?.unwrap_or(1.0),
        seed: uint(obj, "seed")?,
        stop: stop(obj)?,
    };
    // Field names in GenerateParams are those of this API.
    params.validate()?;

    let stream = boolean(obj, "stream")?.unwrap_or(false);
    let include_usage = match present(obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")
            .map_err(|_| ApiError::invalid("stream_options.include_usage", "must be a boolean"))?
            .unwrap_or(false),
        Some(_) => return Err(ApiError::invalid("stream_options", "must be an object")),
    };
    Ok(ChatRequest {
        messages,
        params,
        stream,
        include_usage,
    })
}

fn messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let list = present(obj, "messages")
        .ok_or_else(|| ApiError::invalid("messages", "is required"))?
        .as_array()
        .ok_or_else(|| ApiError::invalid("messages", "must be an array"))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let m = m
            .as_object()
            .ok_or_else(|| ApiError::invalid(format!("messages[{i}]"), "must be an object"))?;
        let role = match present(m, "role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant" | "model") => Role::Assistant,
            _ => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    "must be system, developer, user or assistant",
                ));
            }
        };
        let content = match present(m, "content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let param = format!("messages[{i}].content[{j}]");
                    if part.get("type").and_then(Value::as_str) != Some("text") {
                        return Err(ApiError::invalid(
                            format!("{param}.type"),
                            "must be text (this model reads text only)",
                        ));
                    }
                    let text = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                        ApiError::invalid(format!("{param}.text"), "must be a string")
                    })?;
                    texts.push(text);
                }
                texts.join("\n")
            }
            _ => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    "must be a string or an array of text parts",
                ));
            }
        };
        out.push(ChatMessage::new(role, content));
    }
    // Gemma's turn rules; the error names messages[i].role.
    chat_prompt(&out)?;
    Ok(out)
}

fn stop(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match present(obj, "stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::invalid(format!("stop[{i}]"), "must be a string"))
            })
            .collect(),
        Some(_) => Err(ApiError::invalid(
            "stop",
            "must be a string or an array of strings",
        )),
    }
}

/// A field, with JSON `null` read as absent (as OpenAI does).
fn present<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn string(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    present(obj, name)
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| ApiError::invalid(name, "must be a string"))
        })
        .transpose()
}

fn number(obj: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    present(obj, name)
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| ApiError::invalid(name, "must be a number"))
        })
        .transpose()
}

fn float(obj: &Map<String, Value>, name: &str) -> Result<Option<f32>, ApiError> {
    // Out-of-range values become infinities, which validation rejects with the limit.
    Ok(number(obj, name)?.map(|x| x as f32))
}

fn uint(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    present(obj, name)
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| ApiError::invalid(name, "must be a non-negative integer"))
        })
        .transpose()
}

fn boolean(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    present(obj, name)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| ApiError::invalid(name, "must be a boolean"))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_keep_their_field_as_param_and_prompt_becomes_messages() {
        let e = ApiError::from(Error::invalid("temperature", "must be in [0, 2] (got 5)"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert_eq!(e.message, "temperature must be in [0, 2] (got 5)");
        let e = ApiError::from(Error::invalid("prompt", "is 900 tokens; ..."));
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(
            e.message.starts_with("messages is 900 tokens"),
            "{}",
            e.message
        );
        assert_eq!(e.body()["error"]["type"], json!("invalid_request_error"));
    }

    #[test]
    fn internal_failures_are_not_described_to_the_client() {
        let e = ApiError::from(Error::Internal("tensor shape [3, 4] mismatch".into()));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.message, "inference failure");
        let e = ApiError::from(Error::Unavailable("worker gone".into()));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn stop_sequences_fold_into_openai_stop() {
        assert_eq!(openai_finish_reason(FinishReason::StopSequence), "stop");
        assert_eq!(openai_finish_reason(FinishReason::Length), "length");
    }
}
