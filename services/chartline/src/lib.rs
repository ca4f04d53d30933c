//! Chartline's process assembly: configuration, the servers (gRPC and HTTP), and the CLI
//! commands. `main.rs` only parses the command line and calls in here, so the end-to-end
//! tests start exactly what an operator starts.

pub mod bench;
pub mod bench_prompt;
pub mod bench_vision;
pub mod config;
pub mod ingest_cli;
pub mod prompt_cli;
pub mod server;
pub mod tokens;
pub mod demo;

/// Starts `tracing` output on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
