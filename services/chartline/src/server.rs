//! The servers: gRPC (IngestService, health, reflection) and HTTP (FHIR REST), started
//! together, stopped together.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use chartline_fhir::Limits;
use chartline_ingest::Ingestor;
use chartline_ingest::grpc::IngestGrpc;
use chartline_proto::v1::ingest_service_server::IngestServiceServer;
use chartline_proto::v1::timeline_service_server::TimelineServiceServer;
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

/// What the servers serve.
pub struct Services {
    /// The database.
    pub store: Store,
    /// Input limits for ingest.
    pub limits: Limits,
    /// The model's tokenizer, for prompt budgets.
    pub counter: Arc<dyn TokenCounter>,
}

/// Starts both servers on the given listeners (bind `127.0.0.1:0` in tests).
pub async fn start(services: Services, grpc: TcpListener, http: TcpListener) -> anyhow::Result<Running> {
    let Services { store, limits, counter } = services;
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    let shutdown = CancellationToken::new();
    let timeline = Timeline::new(store.clone(), counter);
    let ingestor = Ingestor::new(store, limits);

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(chartline_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    health.set_serving::<IngestServiceServer<IngestGrpc>>().await;
    health.set_serving::<TimelineServiceServer<TimelineGrpc>>().await;

    let token = shutdown.clone();
    let grpc_task = tokio::spawn({
        let ingest = chartline_ingest::grpc::server(ingestor.clone());
        async move {
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(ingest)
                .add_service(chartline_timeline::grpc::server(timeline))
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(grpc), token.cancelled_owned())
                .await
                .context("gRPC server")
        }
    });
    let token = shutdown.clone();
    let app = chartline_ingest::rest::router(ingestor).route("/healthz", axum::routing::get(|| async { "ok" }));
    let http_task = tokio::spawn(async move {
        axum::serve(http, app).with_graceful_shutdown(token.cancelled_owned()).await.context("HTTP server")
    });
    tracing::info!(%grpc_addr, %http_addr, "serving");
    Ok(Running { grpc_addr, http_addr, shutdown, tasks: vec![grpc_task, http_task] })
}

/// `chartline serve`: runs until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    tracing::info!(database = %args.db.redacted_url(), grpc = %args.grpc_addr, http = %args.http_addr, "starting");
    let store = open_store(&args.db).await?;
    let grpc = TcpListener::bind(args.grpc_addr).await.with_context(|| format!("binding {}", args.grpc_addr))?;
    let http = TcpListener::bind(args.http_addr).await.with_context(|| format!("binding {}", args.http_addr))?;
    let counter = crate::tokens::ModelTokenCounter::load(&args.model)?;
    let running = start(Services { store, limits: args.limits.limits(), counter }, grpc, http).await?;
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
