//! The GGUF Gemma 3 engine against llama.cpp's greedy tokens, and the engine's contract:
//! determinism, seeds, limits, stop sequences, streaming order, cancellation, bad requests.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chartline_inference::{
    BackendKind, ChatMessage, Engine, ErrorCategory, FinishReason, GenerateParams, GenerationEvent,
    GgufOptions, chat_prompt,
};
use futures::StreamExt;

/// One engine per test binary; tests take turns (the engine serves one request at a time, and
/// timing assertions need it idle).
fn engine() -> &'static Engine {
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

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Collects a stream: token ids, text, and the final event.
async fn run(
    prompt: &str,
    params: GenerateParams,
) -> (Vec<u32>, String, chartline_inference::Completion) {
    let mut stream = engine().generate(prompt, params);
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(event) = stream.next().await {
        match event.expect("generation succeeds") {
            GenerationEvent::Token(t) => {
                ids.push(t.id);
                text.push_str(&t.text);
            }
            GenerationEvent::Finished(c) => {
                assert!(
                    stream.next().await.is_none(),
                    "nothing follows the final event"
                );
                return (ids, text, c);
            }
        }
    }
    panic!("stream ended without a final event");
}

async fn error_of(prompt: &str, params: GenerateParams) -> chartline_inference::Error {
    let mut stream = engine().generate(prompt, params);
    match stream.next().await {
        Some(Err(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn greedy_tokens_match_llama_cpp_for_the_clinical_prompts() {
    let _turn = TURN.lock().await;
    let reference = common::reference();
    let mut report = Vec::new();
    for case in &reference.greedy {
        let (ids, text, done) = run(&case.prompt, GenerateParams::greedy(16)).await;
        assert_eq!(
            done.usage.prompt_tokens,
            case.prompt_ids.len(),
            "prompt tokenized as llama.cpp"
        );
        let same = ids
            .iter()
            .zip(&case.greedy_ids)
            .take_while(|(a, b)| a == b)
            .count();
        report.push(format!("{same}/16 {:?} -> {text:?}", case.prompt));
        assert_eq!(
            ids[..8],
            case.greedy_ids[..8],
            "first 8 greedy tokens of {:?} equal llama.cpp's",
            case.prompt
        );
    }
    println!(
        "greedy agreement with llama.cpp (leading tokens equal):\n{}",
        report.join("\n")
    );
}

#[tokio::test]
async fn greedy_output_is_identical_across_runs() {
    let _turn = TURN.lock().await;
    let prompt = "Assessment and plan for a patient with chronic kidney disease:";
    let a = run(prompt, GenerateParams::greedy(24)).await;
    let b = run(prompt, GenerateParams::greedy(24)).await;
    assert_eq!(a.0, b.0, "same token ids");
    assert_eq!(a.1, b.1, "same text");
    assert_eq!(a.2.seed, None, "greedy reports no seed");
    assert_eq!(a.2.model.backend, BackendKind::Gguf);
    assert!(engine().is_running(), "the model thread is alive");
    assert_eq!(
        a.2.model.weights_sha256,
        common::reference().model_sha256,
        "identity hashes the weights"
    );
}

#[tokio::test]
async fn seeded_sampling_reproduces_and_reports_its_seed() {
    let _turn = TURN.lock().await;
    let params = |seed| GenerateParams {
        max_tokens: 16,
        temperature: 1.0,
        top_p: 0.95,
        top_k: 64,
        seed: Some(seed),
        ..Default::default()
    };
    let prompt = "The differential diagnosis of chest pain includes";
    let a = run(prompt, params(1234)).await;
    let b = run(prompt, params(1234)).await;
    assert_eq!(a.0, b.0, "the same seed reproduces the same tokens");
    assert_eq!(a.2.seed, Some(1234));
    let c = run(prompt, params(99)).await;
    let d = run(prompt, params(7)).await;
    assert!(
        a.0 != c.0 || a.0 != d.0,
        "other seeds sample other continuations"
    );

    let unseeded = run(
        prompt,
        GenerateParams {
            seed: None,
            ..params(0)
        },
    )
    .await;
    let seed = unseeded.2.seed.expect("a drawn seed is reported");
    let replay = run(prompt, params(seed)).await;
    assert_eq!(
        unseeded.0, replay.0,
        "replaying the reported seed reproduces the output"
    );
}

#[tokio::test]
async fn max_tokens_is_a_hard_limit() {
    let _turn = TURN.lock().await;
    let (ids, _, done) = run("The patient reports", GenerateParams::greedy(5)).await;
    assert_eq!(ids.len(), 5);
    assert_eq!(done.usage.completion_tokens, 5);
    assert_eq!(done.finish_reason, FinishReason::Length);
}

#[tokio::test]
async fn stop_sequences_end_generation_and_are_not_output() {
    let _turn = TURN.lock().await;
    // Greedy continuation is " a history of hypertension and diabetes mellitus. He has…".
    let prompt = "The patient is a 67-year-old man with";
    let params = GenerateParams {
        stop: vec!["diabetes".into()],
        ..GenerateParams::greedy(16)
    };
    let (ids, text, done) = run(prompt, params).await;
    assert_eq!(done.finish_reason, FinishReason::StopSequence);
    assert_eq!(
        text, " a history of hypertension and ",
        "output ends right before the stop sequence"
    );
    assert_eq!(
        ids.len(),
        done.usage.completion_tokens,
        "one token event per generated token"
    );
    assert!(ids.len() < 16, "stopped early");

    // A stop sequence spanning tokens, and one that never occurs.
    let params = GenerateParams {
        stop: vec!["tension and diab".into(), "zzz".into()],
        ..GenerateParams::greedy(16)
    };
    let (_, text, done) = run(prompt, params).await;
    assert_eq!(done.finish_reason, FinishReason::StopSequence);
    assert_eq!(text, " a history of hyper");
}

#[tokio::test]
async fn stream_yields_tokens_then_exactly_one_final_event() {
    let _turn = TURN.lock().await;
    let mut stream = engine().generate("Hypertension is treated with", GenerateParams::greedy(6));
    let mut events = Vec::new();
    while let Some(e) = stream.next().await {
        events.push(e.expect("no error"));
    }
    let finals = events
        .iter()
        .filter(|e| matches!(e, GenerationEvent::Finished(_)))
        .count();
    assert_eq!(finals, 1, "one final event");
    assert!(
        matches!(events.last(), Some(GenerationEvent::Finished(_))),
        "and it comes last"
    );
    assert_eq!(events.len(), 7, "6 tokens then the final event");
    let Some(GenerationEvent::Finished(done)) = events.last() else {
        unreachable!()
    };
    assert_eq!(done.usage.prompt_tokens, 6);
    assert_eq!(done.model.context_length, 1024);
}

#[tokio::test]
async fn dropping_the_stream_cancels_and_the_engine_serves_the_next_request_promptly() {
    let _turn = TURN.lock().await;
    let mut stream = engine().generate(
        "Write a long discharge summary:",
        GenerateParams::greedy(900),
    );
    for _ in 0..3 {
        assert!(matches!(
            stream.next().await,
            Some(Ok(GenerationEvent::Token(_)))
        ));
    }
    drop(stream);
    // Had the engine kept going, this would wait behind ~900 tokens (tens of seconds).
    let started = Instant::now();
    let (ids, _, _) = tokio::time::timeout(
        Duration::from_secs(30),
        run("Hello", GenerateParams::greedy(4)),
    )
    .await
    .expect("the next request is served");
    assert_eq!(ids.len(), 4);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "the cancelled request stopped (next one took {waited:?})"
    );
}

#[tokio::test]
async fn chat_prompt_generation_stops_at_end_of_turn_or_limit() {
    let _turn = TURN.lock().await;
    let prompt = chat_prompt(&[
        ChatMessage::system("Answer briefly."),
        ChatMessage::user("What is HbA1c?"),
    ])
    .unwrap();
    let (_, _, done) = run(&prompt, GenerateParams::greedy(12)).await;
    assert!(
        matches!(
            done.finish_reason,
            FinishReason::Stop | FinishReason::Length
        ),
        "{:?}",
        done.finish_reason
    );
    assert!(done.usage.prompt_tokens > 10);
}

#[tokio::test]
async fn bad_requests_are_invalid_arguments_naming_the_field() {
    let _turn = TURN.lock().await;
    let cases: Vec<(&str, String, GenerateParams)> = vec![
        ("prompt", String::new(), GenerateParams::greedy(4)),
        ("prompt", "word ".repeat(2000), GenerateParams::greedy(4)),
        ("prompt", "Hello".into(), GenerateParams::greedy(1024)),
        (
            "temperature",
            "Hello".into(),
            GenerateParams {
                temperature: -1.0,
                ..Default::default()
            },
        ),
        (
            "top_p",
            "Hello".into(),
            GenerateParams {
                top_p: 1.5,
                ..Default::default()
            },
        ),
        (
            "max_tokens",
            "Hello".into(),
            GenerateParams {
                max_tokens: 0,
                ..Default::default()
            },
        ),
    ];
    for (field, prompt, params) in cases {
        let e = error_of(&prompt, params).await;
        assert_eq!(e.category(), ErrorCategory::InvalidArgument, "{e}");
        assert_eq!(e.field(), Some(field), "error names the field: {e}");
        assert!(
            e.to_string().starts_with(field),
            "message starts with the field: {e}"
        );
    }
    let e = error_of(&"word ".repeat(2000), GenerateParams::greedy(4)).await;
    assert!(
        e.to_string().contains("context length of 1024"),
        "states the limit: {e}"
    );
    // The engine is still healthy.
    let (ids, _, _) = run("Hello", GenerateParams::greedy(2)).await;
    assert_eq!(ids.len(), 2);
}
