//! The `openai` backend against a real peer: Chartline's OpenAI-compatible face
//! (`openai_server`) over the real Gemma 3 270M GGUF engine, on `127.0.0.1:0`. Greedy output
//! through the remote backend must equal the local engine's; streaming, limits, stop
//! sequences, cancellation, a down or silent endpoint, bad specs, and the face's own request
//! validation.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chartline_inference::grpc::Models;
use chartline_inference::{
    BackendKind, ChatMessage, Completion, Engine, ErrorCategory, FinishReason, GenerateParams,
    GenerationEvent, GenerationStream, GgufOptions, OpenAiBackend, OpenAiOptions, openai_server,
};
use futures::StreamExt;
use serde_json::{Value, json};

/// The local engine, shared by the face and the direct comparisons.
fn local() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let options = GgufOptions {
            context_length: Some(1024),
            ..Default::default()
        };
        Engine::load_gguf(common::gemma_path(), &options)
            .expect("the embedded Gemma 3 270M GGUF loads")
    })
}

/// The face over the local engine, served from its own thread and runtime so that it outlives
/// each test's runtime. Returns the API base URL.
fn face() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let models = Models::new();
        models.set_engine(local().clone());
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        std::thread::Builder::new()
            .name("openai-face".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("the face's runtime starts");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("binds a free port");
                    tx.send(listener.local_addr().expect("has an address"))
                        .expect("the test waits for the address");
                    axum::serve(listener, openai_server::router(models))
                        .await
                        .expect("the face serves");
                });
            })
            .expect("the face's thread starts");
        let addr = rx.recv().expect("the face reports its address");
        format!("http://{addr}/v1")
    })
}

/// An engine over the `openai` backend pointed at the face.
fn remote() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let spec = format!("openai:{}#{}", face(), local().identity().name);
        let backend =
            OpenAiBackend::from_spec(&spec, OpenAiOptions::default()).expect("the spec parses");
        Engine::spawn(backend).expect("the remote engine starts")
    })
}

/// Tests take turns: the local engine serves one request at a time, and the cancellation test
/// times it.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Run {
    ids: Vec<u32>,
    text: String,
    done: Completion,
}

async fn collect(mut stream: GenerationStream) -> Run {
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(event) = stream.next().await {
        match event.expect("generation succeeds") {
            GenerationEvent::Token(t) => {
                ids.push(t.id);
                text.push_str(&t.text);
            }
            GenerationEvent::Finished(done) => {
                assert!(
                    stream.next().await.is_none(),
                    "nothing follows the final event"
                );
                return Run { ids, text, done };
            }
        }
    }
    panic!("stream ended without a final event");
}

async fn error_of(mut stream: GenerationStream) -> chartline_inference::Error {
    match stream.next().await {
        Some(Err(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn question() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("Answer in one short paragraph."),
        ChatMessage::user("What is the first-line drug treatment for type 2 diabetes?"),
    ]
}

#[tokio::test]
async fn remote_greedy_output_equals_the_local_engines() {
    let _turn = TURN.lock().await;
    let here = collect(local().generate_chat(question(), GenerateParams::greedy(32))).await;
    let there = collect(remote().generate_chat(question(), GenerateParams::greedy(32))).await;
    assert!(!here.text.is_empty(), "the model said something");
    assert_eq!(there.text, here.text, "same text");
    assert_eq!(there.ids, here.ids, "same token ids (the face sends them)");
    assert_eq!(
        there.done.usage, here.done.usage,
        "same prompt and completion token counts"
    );
    assert_eq!(there.done.finish_reason, here.done.finish_reason);
    assert_eq!(there.done.seed, None, "greedy reports no seed");

    let id = &there.done.model;
    assert_eq!(id.backend, BackendKind::OpenAi);
    assert_eq!(
        id.name,
        local().identity().name,
        "named by the spec's MODEL"
    );
    assert!(
        id.weights_sha256.starts_with("remote:"),
        "{}",
        id.weights_sha256
    );
    assert!(remote().tokenizer().is_none(), "no local tokenizer");

    // The seed and sampling parameters travel: a seeded sample is the local one.
    let sampled = GenerateParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        seed: Some(4242),
        ..GenerateParams::greedy(16)
    };
    let here = collect(local().generate_chat(question(), sampled.clone())).await;
    let there = collect(remote().generate_chat(question(), sampled)).await;
    assert_eq!(
        there.ids, here.ids,
        "the same seed samples the same tokens remotely"
    );
    assert_eq!(
        there.done.seed,
        Some(4242),
        "the seed is reported for replay"
    );
}

#[tokio::test]
async fn remote_tokens_stream_in_before_the_final_event() {
    let _turn = TURN.lock().await;
    let messages = vec![ChatMessage::user(
        "List ten common antihypertensive drugs, one per line.",
    )];
    let started = Instant::now();
    let mut stream = remote().generate_chat(messages, GenerateParams::greedy(48));
    let mut token_times = Vec::new();
    let mut finished = None;
    while let Some(event) = stream.next().await {
        match event.expect("generation succeeds") {
            GenerationEvent::Token(_) => {
                assert!(finished.is_none(), "no token after the final event");
                token_times.push(started.elapsed());
            }
            GenerationEvent::Finished(done) => finished = Some((started.elapsed(), done)),
        }
    }
    let (finished_at, done) = finished.expect("one final event");
    assert_eq!(
        done.finish_reason,
        FinishReason::Length,
        "premise: a long answer"
    );
    assert_eq!(token_times.len(), 48, "one event per token");
    assert_eq!(done.usage.completion_tokens, 48);
    // Buffered output would arrive all at once at the end; streamed output arrives as the
    // model decodes, so the first token comes well before the last.
    let first = token_times[0];
    assert!(
        first < finished_at / 2,
        "first token after {first:?}, final event after {finished_at:?}"
    );
}

#[tokio::test]
async fn max_tokens_and_stop_sequences_hold_remotely() {
    let _turn = TURN.lock().await;
    let run = collect(remote().generate_chat(question(), GenerateParams::greedy(5))).await;
    assert_eq!(run.ids.len(), 5, "five tokens");
    assert_eq!(run.done.usage.completion_tokens, 5);
    assert_eq!(run.done.finish_reason, FinishReason::Length);

    // A stop sequence taken from the middle of the greedy answer.
    let full = collect(local().generate_chat(question(), GenerateParams::greedy(24))).await;
    let stop = full
        .text
        .split_whitespace()
        .filter(|w| w.len() >= 4)
        .nth(2)
        .expect("the answer has a few words")
        .to_owned();
    let expected = &full.text[..full.text.find(&stop).expect("the stop word occurs")];
    let params = GenerateParams {
        stop: vec![stop.clone(), "zzzz".into()],
        ..GenerateParams::greedy(24)
    };
    let run = collect(remote().generate_chat(question(), params)).await;
    assert_eq!(run.text, expected, "output ends right before {stop:?}");
    assert_eq!(run.done.finish_reason, FinishReason::StopSequence);
    assert_eq!(run.ids.len(), run.done.usage.completion_tokens);
}

#[tokio::test]
async fn dropping_the_remote_stream_stops_the_remote_generation() {
    let _turn = TURN.lock().await;
    let messages = vec![ChatMessage::user(
        "Count from 1 to 1000, writing every number in words.",
    )];
    let mut stream = remote().generate_chat(messages, GenerateParams::greedy(900));
    for _ in 0..3 {
        assert!(
            matches!(stream.next().await, Some(Ok(GenerationEvent::Token(_)))),
            "tokens arrive"
        );
    }
    drop(stream);
    // The face's engine is the local one: had the remote generation gone on, this request
    // would queue behind up to ~900 tokens (tens of seconds).
    let started = Instant::now();
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        collect(local().generate("Hello", GenerateParams::greedy(4))),
    )
    .await
    .expect("the next request is served");
    assert_eq!(run.ids.len(), 4);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "the remote generation stopped (the next request took {waited:?})"
    );
    // And the remote engine serves again.
    let run = collect(remote().generate_chat(question(), GenerateParams::greedy(3))).await;
    assert_eq!(run.ids.len(), 3);
}

fn quick_options() -> OpenAiOptions {
    OpenAiOptions {
        connect_timeout: Duration::from_millis(500),
        read_timeout: Duration::from_millis(300),
        max_retries: 2,
        retry_backoff: Duration::from_millis(10),
        api_key: Some("sk-test-secret-value".into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_down_endpoint_is_unavailable_naming_the_url_quickly() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        listener.local_addr().expect("has an address").port()
    };
    let url = format!("http://127.0.0.1:{port}/v1");
    let backend = OpenAiBackend::from_spec(&format!("openai:{url}#some-model"), quick_options())
        .expect("the spec parses");
    let engine = Engine::spawn(backend).expect("starts");
    let started = Instant::now();
    let e = error_of(engine.generate_chat(question(), GenerateParams::greedy(4))).await;
    let elapsed = started.elapsed();
    assert_eq!(e.category(), ErrorCategory::Unavailable, "{e}");
    let message = e.to_string();
    assert!(message.contains(&url), "names the URL: {message}");
    assert!(message.contains("3 attempt"), "retried twice: {message}");
    assert!(!message.contains("sk-test-secret"), "no secret: {message}");
    assert!(elapsed < Duration::from_secs(5), "fails fast ({elapsed:?})");
}

#[tokio::test]
async fn a_silent_endpoint_times_out_as_unavailable() {
    // Accepts connections (the kernel's backlog) but never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let url = format!(
        "http://{}/v1",
        listener.local_addr().expect("has an address")
    );
    let options = OpenAiOptions {
        max_retries: 1,
        ..quick_options()
    };
    let backend =
        OpenAiBackend::from_spec(&format!("openai:{url}#m"), options).expect("the spec parses");
    let engine = Engine::spawn(backend).expect("starts");
    let started = Instant::now();
    let e = error_of(engine.generate_chat(question(), GenerateParams::greedy(4))).await;
    assert_eq!(e.category(), ErrorCategory::Unavailable, "{e}");
    let message = e.to_string();
    assert!(
        message.contains(&url) && message.contains("timed out"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "read timeout holds"
    );
    drop(listener);
}

#[tokio::test]
async fn bad_specs_and_raw_prompts_are_invalid_arguments_naming_the_field() {
    let cases = [
        ("openai:http://127.0.0.1:9/v1", "spec.model"),
        ("openai:http://127.0.0.1:9/v1#", "spec.model"),
        ("openai:ftp://127.0.0.1/v1#m", "spec.url"),
        ("openai:127.0.0.1:9/v1#m", "spec.url"),
        ("openai:#m", "spec.url"),
        ("gguf:/models/x.gguf", "spec"),
    ];
    for (spec, field) in cases {
        let e = OpenAiBackend::from_spec(spec, OpenAiOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{spec:?} is refused"));
        assert_eq!(
            e.category(),
            ErrorCategory::InvalidArgument,
            "{spec:?}: {e}"
        );
        assert_eq!(e.field(), Some(field), "{spec:?}: {e}");
        assert!(
            e.to_string().starts_with(field),
            "message starts with the field: {e}"
        );
    }

    let backend =
        OpenAiBackend::from_spec("openai:http://127.0.0.1:9/v1#m", OpenAiOptions::default())
            .expect("parses");
    let engine = Engine::spawn(backend).expect("starts");
    let e = error_of(engine.generate("<start_of_turn>user\nHi", GenerateParams::greedy(4))).await;
    assert_eq!(
        e.field(),
        Some("messages"),
        "a raw prompt cannot go to a chat endpoint: {e}"
    );
}

#[tokio::test]
async fn the_faces_rejections_come_back_as_invalid_arguments() {
    let _turn = TURN.lock().await;
    let long = vec![ChatMessage::user("word ".repeat(2000))];
    let e = error_of(remote().generate_chat(long, GenerateParams::greedy(4))).await;
    assert_eq!(e.category(), ErrorCategory::InvalidArgument, "{e}");
    assert_eq!(e.field(), Some("messages"), "{e}");
    assert!(e.to_string().contains("HTTP 400"), "{e}");
    assert!(
        !e.to_string().contains("word word"),
        "no prompt text in errors: {e}"
    );
}

async fn post(body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", face()))
        .json(&body)
        .send()
        .await
        .expect("the face answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

#[tokio::test]
async fn the_face_answers_openai_clients_and_names_bad_fields() {
    let _turn = TURN.lock().await;
    let model = local().identity().name.clone();
    let client = reqwest::Client::new();

    let models: Value = client
        .get(format!("{}/models", face()))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        models["data"][0]["id"],
        json!(model),
        "lists the served model"
    );

    let here = collect(local().generate_chat(question(), GenerateParams::greedy(12))).await;
    let (status, body) = post(json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "Answer in one short paragraph."},
            {"role": "user", "content": [{"type": "text", "text": "What is the first-line drug treatment for type 2 diabetes?"}]},
        ],
        "temperature": 0,
        "max_tokens": 12,
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], json!("chat.completion"));
    assert_eq!(body["choices"][0]["message"]["content"], json!(here.text));
    assert_eq!(
        body["usage"]["completion_tokens"],
        json!(here.done.usage.completion_tokens)
    );

    let user = json!([{"role": "user", "content": "Hi"}]);
    let cases = [
        (
            json!({"model": model, "messages": user, "temperature": 5}),
            "temperature",
        ),
        (
            json!({"model": model, "messages": user, "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": model, "messages": user, "top_p": "high"}),
            "top_p",
        ),
        (
            json!({"model": model, "messages": user, "stop": ["ok", ""]}),
            "stop[1]",
        ),
        (json!({"model": model, "messages": user, "n": 2}), "n"),
        (json!({"model": model, "messages": []}), "messages"),
        (json!({"model": model}), "messages"),
        (json!({"messages": user}), "model"),
        (
            json!({"model": model, "messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": model, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            "messages[1].role",
        ),
        (
            json!({"model": model, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "word ".repeat(2000)}]}),
            "messages",
        ),
    ];
    for (request, param) in cases {
        let (status, body) = post(request.clone()).await;
        assert_eq!(status, 400, "{request} -> {body}");
        assert_eq!(
            body["error"]["type"],
            json!("invalid_request_error"),
            "{body}"
        );
        assert_eq!(body["error"]["param"], json!(param), "{request} -> {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(param),
            "message names the field: {message}"
        );
        assert!(!message.contains("word word"), "no message text in errors");
    }

    let (status, body) = post(json!({"model": "gpt-4o", "messages": user})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], json!("model_not_found"));

    let response = client
        .post(format!("{}/chat/completions", face()))
        .body("{not json")
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["param"], json!("body"));
}
