//! `InferenceService` over the wire, on the real embedded model: two server processes give
//! the same greedy output; bad requests are INVALID_ARGUMENT naming the field; health is
//! NOT_SERVING until the model is loaded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use chartline_proto::v1::inference_service_client::InferenceServiceClient;
use chartline_proto::v1::{ChatMessage, EmbedRequest, GenerateRequest, GenerationParameters, ModelInfoRequest, TokenizeRequest, generate_response};
use futures::StreamExt;
use sqlx::PgPool;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

struct Server {
    child: Child,
    grpc: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `chartline serve` and waits (health Watch, no polling) until inference serves.
async fn serve(database_url: &str) -> Server {
    let models = std::env::var("CHARTLINE_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("models"));
    let (g, h) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_chartline"))
        .args(["serve", "--summary-workers", "0"])
        .arg("--grpc-addr")
        .arg(format!("127.0.0.1:{g}"))
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{h}"))
        .arg("--model")
        .arg(models.join("gemma3-270m/gemma-3-270m-q4_k_m.gguf"))
        .arg("--embedding-model")
        .arg(models.join("all-minilm-l6-v2"))
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chartline starts");
    let grpc = format!("http://127.0.0.1:{g}");
    let mut server = Server { child, grpc: grpc.clone() };
    // The server logs "serving" once both listeners are bound; read its log until then.
    let stderr = server.child.stderr.take().expect("piped stderr");
    let bound = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let found = lines.by_ref().map_while(Result::ok).any(|l| l.contains("serving"));
        // Keep draining so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        found
    });
    assert!(tokio::time::timeout(std::time::Duration::from_secs(60), bound).await.expect("bound in time").expect("reader"), "server started");
    let channel = Channel::from_shared(grpc.clone()).expect("uri").connect().await.expect("the server accepts connections");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest { service: "chartline.v1.InferenceService".into() })
        .await
        .expect("health watch")
        .into_inner();
    tokio::time::timeout(std::time::Duration::from_secs(120), async {
        while let Some(s) = watch.next().await {
            let s = s.expect("health status").status;
            if s == ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("health stream ended before SERVING");
    })
    .await
    .expect("the model loads");
    server
}

fn url_for(pool: &PgPool) -> String {
    let db = pool.connect_options().get_database().expect("test database").to_owned();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    format!("{}/{db}", base.rsplit_once('/').map_or(base.as_str(), |(b, _)| b))
}

async fn greedy(c: &mut InferenceServiceClient<Channel>, prompt: &str) -> (Vec<u32>, String, String) {
    let mut s = c
        .generate(GenerateRequest {
            prompt: prompt.into(),
            parameters: Some(GenerationParameters { max_tokens: 16, ..Default::default() }),
            ..Default::default()
        })
        .await
        .expect("generate")
        .into_inner();
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(m) = s.next().await {
        match m.expect("event").event {
            Some(generate_response::Event::Token(t)) => {
                ids.push(t.id);
                text.push_str(&t.text);
            }
            Some(generate_response::Event::Final(f)) => {
                assert_eq!(f.text, text, "the final text is the streamed tokens");
                assert_eq!(f.usage.map(|u| u.completion_tokens as usize), Some(ids.len()));
                return (ids, text, f.model.map(|m| m.weights_sha256).unwrap_or_default());
            }
            None => {}
        }
    }
    panic!("no final event");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn two_server_processes_give_identical_greedy_output(pool: PgPool) {
    let url = url_for(&pool);
    let (a, b) = (serve(&url).await, serve(&url).await);
    let mut ca = InferenceServiceClient::connect(a.grpc.clone()).await.expect("connect");
    let mut cb = InferenceServiceClient::connect(b.grpc.clone()).await.expect("connect");
    let prompt = "Chronic kidney disease is";
    let (ia, ta, wa) = greedy(&mut ca, prompt).await;
    let (ib, tb, wb) = greedy(&mut cb, prompt).await;
    assert_eq!(ia, ib, "same token ids from two processes");
    assert_eq!(ta, tb);
    assert_eq!(wa, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818");
    assert_eq!(wa, wb);
    assert!(ta.starts_with(" a major public health problem"), "llama.cpp's continuation: {ta:?}");

    let info = ca.model_info(ModelInfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.model.map(|m| m.backend), Some("gguf".to_owned()));
    assert_eq!(info.embedding_dimensions, 384);
    let ids = ca.tokenize(TokenizeRequest { text: "Hello world".into(), add_bos: true }).await.expect("tokenize").into_inner().ids;
    assert_eq!(ids, [2, 9259, 1902], "llama.cpp's ids");
    let e = ca.embed(EmbedRequest { texts: vec!["heart attack".into(), "myocardial infarction".into()] }).await.expect("embed").into_inner();
    assert_eq!(e.embeddings.len(), 2);
    let norm: f32 = e.embeddings[0].values.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "L2-normalized: {norm}");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn bad_requests_are_invalid_argument_naming_the_field(pool: PgPool) {
    let server = serve(&url_for(&pool)).await;
    let mut c = InferenceServiceClient::connect(server.grpc.clone()).await.expect("connect");
    let p = |f: fn(&mut GenerationParameters)| {
        let mut g = GenerationParameters { max_tokens: 4, ..Default::default() };
        f(&mut g);
        Some(g)
    };
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (GenerateRequest { prompt: String::new(), ..Default::default() }, "prompt"),
        (GenerateRequest { prompt: "word ".repeat(40_000), parameters: p(|_| {}), ..Default::default() }, "context"),
        (GenerateRequest { prompt: "x".into(), model: "medgemma-27b".into(), ..Default::default() }, "model"),
        (GenerateRequest { prompt: "x".into(), parameters: p(|g| g.temperature = -1.0), ..Default::default() }, "temperature"),
        (GenerateRequest { prompt: "x".into(), parameters: p(|g| g.top_p = 1.5), ..Default::default() }, "top_p"),
        (GenerateRequest { prompt: "x".into(), parameters: p(|g| g.max_tokens = 0), ..Default::default() }, "max_tokens"),
        (GenerateRequest { prompt: "x".into(), parameters: p(|g| g.repetition_penalty = 5.0), ..Default::default() }, "repetition_penalty"),
        (
            GenerateRequest {
                messages: vec![ChatMessage { role: "user".into(), content: "a".into() }, ChatMessage { role: "user".into(), content: "b".into() }],
                ..Default::default()
            },
            "messages",
        ),
        (GenerateRequest { messages: vec![ChatMessage { role: "doctor".into(), content: "a".into() }], ..Default::default() }, "role"),
    ];
    for (req, field) in cases {
        let err = match c.generate(req).await {
            Err(e) => e,
            Ok(resp) => {
                let mut s = resp.into_inner();
                match s.next().await {
                    Some(Err(e)) => e,
                    other => panic!("{field}: expected an error, got {other:?}"),
                }
            }
        };
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {}", err.message());
        assert!(err.message().contains(field), "{field} named in: {}", err.message());
    }
    let err = c.embed(EmbedRequest { texts: vec![] }).await.expect_err("empty");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
