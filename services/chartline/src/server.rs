//! The servers: gRPC (IngestService, health, reflection) and HTTP (FHIR REST), started
//! together, stopped together.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use chartline_fhir::Limits;
use chartline_ingest::Ingestor;
use chartline_ingest::grpc::IngestGrpc;
use chartline_proto::v1::ingest_service_server::IngestServiceServer;
use std::path::PathBuf;

use chartline_cds::audit::Audit;
use chartline_cds::grpc::{AuditGrpc, SummaryGrpc};
use chartline_cds::summary::{SummaryConfig, Summarizer};
use chartline_cds::worker::WorkerConfig;
use chartline_inference::grpc::{InferenceGrpc, Models};
use chartline_inference::{Embedder, Engine, GgufOptions};
use chartline_proto::v1::audit_service_server::AuditServiceServer;
use chartline_proto::v1::inference_service_server::InferenceServiceServer;
use chartline_proto::v1::summary_service_server::SummaryServiceServer;
use chartline_proto::v1::timeline_service_server::TimelineServiceServer;
use tonic::transport::Channel;
use chartline_store::Store;
use chartline_timeline::grpc::TimelineGrpc;
use chartline_timeline::{Timeline, TokenCounter};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{DbArgs, ServeArgs};

/// Servers running in this process.
pub struct Running {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    model_ready: tokio::sync::watch::Receiver<Option<Result<(), String>>>,
}

impl Running {
    /// Stops accepting, finishes in-flight requests, and waits for both servers.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await.context("server task panicked")??;
        }
        Ok(())
    }

    /// Waits until the model has loaded (or failed to); immediately Ok without a model.
    pub async fn model_ready(&self) -> anyhow::Result<()> {
        let mut rx = self.model_ready.clone();
        let state = rx.wait_for(Option::is_some).await.map_err(|_| anyhow::anyhow!("model loader stopped"))?;
        match state.as_ref() {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(anyhow::anyhow!("model failed to load: {e}")),
            None => Err(anyhow::anyhow!("model state unknown")),
        }
    }

    /// A token that stops the servers when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Connects to the database and applies migrations.
pub async fn open_store(db: &DbArgs) -> anyhow::Result<Store> {
    let store = Store::connect(&db.database_url, db.db_max_connections)
        .await
        .with_context(|| format!("connecting to {}", db.redacted_url()))?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// Where the models are.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    /// The generation model: a GGUF file, a Hugging Face safetensors folder, or
    /// `openai:URL#MODEL` for a remote OpenAI-compatible engine (vLLM, TGI, llama.cpp server).
    pub model: PathBuf,
    /// The embedding model folder (safetensors + tokenizer.json), if any.
    pub embedding: Option<PathBuf>,
    /// The image-text model folder (a SigLIP dual encoder such as MedSigLIP), if any.
    pub image_text: Option<PathBuf>,
}

/// What the servers serve.
pub struct Services {
    /// The database.
    pub store: Store,
    /// Input limits for ingest.
    pub limits: Limits,
    /// The model's tokenizer, for prompt budgets.
    pub counter: Arc<dyn TokenCounter>,
    /// The models to load in this process; None serves no model (InferenceService answers
    /// UNAVAILABLE, as when another process or a remote engine serves it).
    pub models: Option<ModelPaths>,
    /// Summary settings.
    pub summary: SummaryConfig,
    /// Run a summary worker in this process.
    pub worker: Option<WorkerConfig>,
    /// Base URL put into CDS card links (default `http://<http address>`).
    pub public_url: Option<String>,
    /// Largest attachment the timeline returns (GetAttachment) or attaches to a prompt.
    pub max_attachment_bytes: u64,
}

impl Services {
    /// Ingest and timeline only: no model, no worker.
    pub fn without_model(store: Store, limits: Limits, counter: Arc<dyn TokenCounter>) -> Self {
        Services {
            store,
            limits,
            counter,
            models: None,
            summary: SummaryConfig::default(),
            worker: None,
            public_url: None,
            max_attachment_bytes: chartline_timeline::DEFAULT_MAX_ATTACHMENT_BYTES,
        }
    }
}

/// Starts both servers on the given listeners (bind `127.0.0.1:0` in tests).
pub async fn start(services: Services, grpc: TcpListener, http: TcpListener) -> anyhow::Result<Running> {
    let Services { store, limits, counter, models: model_paths, summary, worker, public_url, max_attachment_bytes } = services;
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    let shutdown = CancellationToken::new();
    let timeline = Timeline::new(store.clone(), counter).with_max_attachment_bytes(max_attachment_bytes);
    let ingestor = Ingestor::new(store.clone(), limits);
    // The orchestrator talks to the timeline and inference services over gRPC, also here.
    let self_channel = Channel::from_shared(format!("http://{grpc_addr}"))?.connect_lazy();
    let summarizer = Summarizer::new(store.clone(), self_channel.clone(), self_channel.clone(), summary);
    let audit = Audit::new(store.clone(), self_channel.clone(), self_channel);
    let models = Models::new();

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(chartline_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    health.set_serving::<IngestServiceServer<IngestGrpc>>().await;
    health.set_serving::<TimelineServiceServer<TimelineGrpc>>().await;
    health.set_serving::<AuditServiceServer<AuditGrpc>>().await;
    health.set_not_serving::<InferenceServiceServer<InferenceGrpc>>().await;
    health.set_not_serving::<SummaryServiceServer<SummaryGrpc>>().await;
    let (ready_tx, model_ready) = tokio::sync::watch::channel(None);
    match model_paths {
        None => {
            let _ = ready_tx.send(Some(Ok(())));
        }
        Some(paths) => {
            let (models, health) = (models.clone(), health.clone());
            tokio::spawn(async move {
                let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    let engine = load_engine(&paths.model)?;
                    models.set_engine(engine);
                    if let Some(dir) = &paths.embedding {
                        models.set_embedder(Embedder::load(dir).with_context(|| format!("loading {}", dir.display()))?);
                    }
                    if let Some(dir) = &paths.image_text {
                        models.set_image_text(
                            chartline_inference::ImageTextEmbedder::load(dir).with_context(|| format!("loading {}", dir.display()))?,
                        );
                    }
                    Ok(())
                })
                .await;
                let result = match loaded {
                    Ok(Ok(())) => {
                        health.set_serving::<InferenceServiceServer<InferenceGrpc>>().await;
                        health.set_serving::<SummaryServiceServer<SummaryGrpc>>().await;
                        tracing::info!("model loaded; inference serving");
                        Ok(())
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %format!("{e:#}"), "model failed to load");
                        Err(format!("{e:#}"))
                    }
                    Err(e) => Err(format!("model loader panicked: {e}")),
                };
                let _ = ready_tx.send(Some(result));
            });
        }
    }

    let token = shutdown.clone();
    let (grpc_models, grpc_summarizer, grpc_audit) = (models.clone(), summarizer.clone(), audit.clone());
    let grpc_task = tokio::spawn({
        let ingest = chartline_ingest::grpc::server(ingestor.clone());
        async move {
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(ingest)
                .add_service(chartline_timeline::grpc::server(timeline))
                .add_service(chartline_inference::grpc::server(grpc_models))
                .add_service(chartline_cds::grpc::summary_server(grpc_summarizer))
                .add_service(chartline_cds::grpc::audit_server(grpc_audit))
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(grpc), token.cancelled_owned())
                .await
                .context("gRPC server")
        }
    });
    let token = shutdown.clone();
    let base_url = public_url.unwrap_or_else(|| format!("http://{http_addr}"));
    let app = chartline_ingest::rest::router(ingestor)
        .merge(chartline_cds::hooks::router(store.clone(), audit, base_url))
        .merge(chartline_inference::openai_server::router(models.clone()))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let http_task = tokio::spawn(async move {
        axum::serve(http, app).with_graceful_shutdown(token.cancelled_owned()).await.context("HTTP server")
    });
    let mut tasks = vec![grpc_task, http_task];
    if let Some(cfg) = worker {
        let token = shutdown.clone();
        let mut ready = model_ready.clone();
        tasks.push(tokio::spawn(async move {
            // A worker that leased jobs while the model loads would only fail them (each
            // failure counts as an attempt and backs the job off): it starts when the model
            // is ready, and not at all when the model failed to load.
            let loaded = tokio::select! {
                _ = token.cancelled() => return Ok(()),
                r = ready.wait_for(Option::is_some) => r.map(|r| matches!(*r, Some(Ok(())))),
            };
            match loaded {
                Ok(true) => chartline_cds::worker::run(summarizer, cfg, token).await,
                _ => tracing::error!(worker = %cfg.worker_id, "the model did not load; the summary worker is not started"),
            }
            Ok(())
        }));
    }
    tracing::info!(%grpc_addr, %http_addr, "serving");
    Ok(Running { grpc_addr, http_addr, shutdown, tasks, model_ready })
}

/// Loads the generation engine a model spec names: `openai:URL#MODEL`, a safetensors
/// folder, or a GGUF file.
pub fn load_engine(model: &std::path::Path) -> anyhow::Result<Engine> {
    let spec = model.to_string_lossy();
    if spec.starts_with(chartline_inference::OPENAI_SPEC_PREFIX) {
        let backend = chartline_inference::OpenAiBackend::from_spec(&spec, chartline_inference::OpenAiOptions::from_env())
            .context("the openai model spec")?;
        return Engine::spawn(backend).context("starting the remote engine");
    }
    if model.is_dir() {
        return Engine::load_safetensors(model, &chartline_inference::SafetensorsOptions::default())
            .with_context(|| format!("loading {}", model.display()));
    }
    Engine::load_gguf(model, &GgufOptions::default()).with_context(|| format!("loading {}", model.display()))
}

/// The tokenizer that budgets prompts: `--tokenizer` when given; a local model's own; for a
/// remote model, the embedded Gemma 3 tokenizer (MedGemma shares Gemma 3's vocabulary).
pub fn tokenizer_path(model: &std::path::Path, tokenizer: Option<&std::path::Path>) -> PathBuf {
    match tokenizer {
        Some(t) => t.to_path_buf(),
        None if model.to_string_lossy().starts_with(chartline_inference::OPENAI_SPEC_PREFIX) => PathBuf::from(crate::config::DEFAULT_MODEL),
        None => model.to_path_buf(),
    }
}

/// `chartline serve`: runs until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    tracing::info!(database = %args.db.redacted_url(), grpc = %args.grpc_addr, http = %args.http_addr, "starting");
    let store = open_store(&args.db).await?;
    let grpc = TcpListener::bind(args.grpc_addr).await.with_context(|| format!("binding {}", args.grpc_addr))?;
    let http = TcpListener::bind(args.http_addr).await.with_context(|| format!("binding {}", args.http_addr))?;
    let counter = crate::tokens::ModelTokenCounter::load(&tokenizer_path(&args.model, args.tokenizer.as_deref()))?;
    let worker = (args.summary_workers > 0).then(|| WorkerConfig {
        worker_id: format!("{}-{}", std::env::var("HOSTNAME").unwrap_or_else(|_| "chartline".into()), std::process::id()),
        lease: chrono::Duration::seconds(args.job_lease_secs),
        idle: std::time::Duration::from_millis(500),
    });
    let services = Services {
        store: store.with_summary_debounce(chrono::Duration::milliseconds(args.summary_debounce_ms)),
        limits: args.limits.limits(),
        counter,
        models: Some(ModelPaths {
            model: args.model.clone(),
            embedding: Some(args.embedding_model.clone()).filter(|p| p.exists()),
            image_text: args.image_model.clone(),
        }),
        summary: SummaryConfig {
            token_budget: args.summary_token_budget,
            max_tokens: args.summary_max_tokens,
            max_images: args.summary_max_images,
        },
        worker,
        public_url: args.public_url.clone(),
        max_attachment_bytes: args.max_attachment_bytes,
    };
    let running = start(services, grpc, http).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await?;
    Ok(ExitCode::SUCCESS)
}

/// `chartline migrate`.
pub async fn migrate(db: &DbArgs) -> anyhow::Result<ExitCode> {
    open_store(db).await?;
    println!("migrations applied to {}", db.redacted_url());
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
