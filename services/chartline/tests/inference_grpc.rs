//! `InferenceService` over the wire, on the real embedded model: two server processes give
//! the same greedy output; bad requests are INVALID_ARGUMENT naming the field; health is
//! NOT_SERVING until the model is loaded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use chartline_proto::v1::inference_service_client::InferenceServiceClient;
use chartline_proto::v1::{
    ChatMessage, ClassifyRequest, EmbedImageRequest, EmbedRequest, EmbeddingSpace, GenerateRequest, GenerationParameters, Image, ModelInfoRequest,
    TokenizeRequest, generate_response,
};
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

/// Starts `chartline serve` with the embedded models and waits until inference serves.
async fn serve(database_url: &str) -> Server {
    let models = std::env::var("CHARTLINE_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("models"));
    serve_with(database_url, &models.join("gemma3-270m/gemma-3-270m-q4_k_m.gguf"), &[]).await
}

/// Starts `chartline serve` with `model` (and `extra` arguments) and waits (health Watch,
/// no polling) until inference serves.
async fn serve_with(database_url: &str, model: &Path, extra: &[&str]) -> Server {
    let models = std::env::var("CHARTLINE_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("models"));
    let (g, h) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_chartline"))
        .args(["serve", "--summary-workers", "0"])
        .arg("--grpc-addr")
        .arg(format!("127.0.0.1:{g}"))
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{h}"))
        .arg("--model")
        .arg(model)
        .arg("--embedding-model")
        .arg(models.join("all-minilm-l6-v2"))
        .args(extra)
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
    let e = ca
        .embed(EmbedRequest { texts: vec!["heart attack".into(), "myocardial infarction".into()], ..Default::default() })
        .await
        .expect("embed")
        .into_inner();
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
        // The embedded model is text-only.
        (GenerateRequest { prompt: "<start_of_image>".into(), images: vec![cxr()], ..Default::default() }, "images"),
        (GenerateRequest { prompt: "x".into(), images: vec![Image::default()], ..Default::default() }, "images[0]"),
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
    let err = c.embed(EmbedRequest { texts: vec![], ..Default::default() }).await.expect_err("empty");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = c.embed(EmbedRequest { texts: vec!["x".into()], space: 7 }).await.expect_err("unknown space");
    assert!(err.message().contains("space"), "{}", err.message());
    // No image model loaded: image calls are UNAVAILABLE, and ModelInfo says so.
    let err = c.embed_image(EmbedImageRequest { images: vec![cxr()] }).await.expect_err("no image model");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
    let info = c.model_info(ModelInfoRequest {}).await.expect("info").into_inner();
    assert!(!info.accepts_images && info.image_model.is_none());
}

fn image_file(rel: &str, content_type: &str) -> Image {
    let p = repo().join("../shared/fixtures/images").join(rel);
    Image { data: std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).into(), content_type: content_type.into(), source: format!("test/{rel}") }
}

fn cxr() -> Image {
    image_file("cxr/nih-cxr14-00000001_000.png", "image/png")
}

/// A MedGemma-shaped multimodal checkpoint and a MedSigLIP-shaped dual encoder (tiny, random
/// weights, the real tensor names) served by the real binary: images travel over gRPC,
/// including the JPEG 2000 chest radiograph DICOM.
#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn multimodal_checkpoints_take_images_over_grpc(pool: PgPool) {
    let fixtures = repo().join("tests/fixtures");
    let image_model = fixtures.join("tiny-medsiglip");
    let server = serve_with(&url_for(&pool), &fixtures.join("tiny-medgemma"), &["--image-model", image_model.to_str().expect("utf-8 path")]).await;
    let mut c = InferenceServiceClient::connect(server.grpc.clone()).await.expect("connect");
    let info = c.model_info(ModelInfoRequest {}).await.expect("info").into_inner();
    assert!(info.accepts_images);
    assert_eq!(info.tokens_per_image, 256);
    assert_eq!(info.model.as_ref().map(|m| m.backend.as_str()), Some("safetensors"));
    assert_eq!(info.image_model.as_ref().map(|m| m.name.as_str()), Some("tiny-medsiglip"));
    assert_eq!(info.image_embedding_dimensions, 32);

    let dicom = image_file("dicom/RG1_J2KI.dcm", "application/dicom");
    let prompt = "<start_of_turn>user\nDescribe <start_of_image> and <start_of_image><end_of_turn>\n<start_of_turn>model\n";
    let base = c.clone();
    let run = |images: Vec<Image>| {
        let mut c = base.clone();
        async move {
            let mut s = c
                .generate(GenerateRequest {
                    prompt: prompt.into(),
                    parameters: Some(GenerationParameters { max_tokens: 4, ..Default::default() }),
                    images,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut ids = Vec::new();
            while let Some(m) = s.next().await {
                match m?.event {
                    Some(generate_response::Event::Token(t)) => ids.push(t.id),
                    Some(generate_response::Event::Final(f)) => return Ok((ids, f.usage.expect("usage").prompt_tokens)),
                    None => {}
                }
            }
            Err(tonic::Status::internal("no final message"))
        }
    };
    let (ids, prompt_tokens) = run(vec![dicom.clone(), cxr()]).await.expect("generate with two images");
    assert_eq!(ids.len(), 4);
    // Each image became 256 soft tokens plus its wrapper.
    let text_only = c.tokenize(TokenizeRequest { text: prompt.into(), add_bos: true }).await.expect("tokenize").into_inner().ids.len() as u32;
    assert!(prompt_tokens >= text_only + 2 * 256, "{prompt_tokens} prompt tokens for {text_only} text tokens and two images");
    // Deterministic; swapping the images keeps the prompt's length.
    assert_eq!(run(vec![dicom.clone(), cxr()]).await.expect("again").0, ids);
    let swapped = run(vec![cxr(), dicom.clone()]).await.expect("swapped");
    assert_eq!(swapped.1, prompt_tokens);

    // Wrong counts and broken images are INVALID_ARGUMENT naming the field.
    let err = run(vec![dicom.clone()]).await.expect_err("one image for two placeholders");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("images"), "{}", err.message());
    let mut broken = dicom.clone();
    broken.data = broken.data.slice(..2000);
    let err = run(vec![broken, cxr()]).await.expect_err("truncated DICOM");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("images[0]"), "{}", err.message());

    // MedSigLIP-shaped: image and text embeddings in one space, zero-shot classification.
    let e = c.embed_image(EmbedImageRequest { images: vec![dicom.clone(), image_file("dicom/CT_small.dcm", "")] }).await.expect("embed image").into_inner();
    assert_eq!((e.embeddings.len(), e.dimensions), (2, 32));
    let t = c.embed(EmbedRequest { texts: vec!["chest x-ray".into()], space: EmbeddingSpace::ImageText as i32 }).await.expect("embed text").into_inner();
    assert_eq!((t.embeddings[0].values.len(), t.model.as_str()), (32, "tiny-medsiglip"));
    let labels = vec!["chest x-ray with cardiomegaly".to_owned(), "normal chest x-ray".to_owned()];
    let scores = c.classify(ClassifyRequest { image: Some(cxr()), labels: labels.clone() }).await.expect("classify").into_inner().scores;
    assert_eq!(scores.iter().map(|s| s.label.clone()).collect::<Vec<_>>(), labels);
    for s in &scores {
        assert!((s.probability - 1.0 / (1.0 + (-s.logit).exp())).abs() < 1e-6, "sigmoid of its own logit");
    }
    let err = c.classify(ClassifyRequest { image: Some(cxr()), labels: vec![] }).await.expect_err("no labels");
    assert!(err.code() == tonic::Code::InvalidArgument && err.message().contains("labels"), "{}", err.message());
    let err = c.classify(ClassifyRequest { image: None, labels }).await.expect_err("no image");
    assert!(err.code() == tonic::Code::InvalidArgument && err.message().contains("image"), "{}", err.message());
}
