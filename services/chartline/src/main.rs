//! `chartline`: parse the command line, start tracing, run the command.

use clap::Parser;

use chartline::config::{Cli, Command};

// Ingest builds and drops many small JSON trees; mimalloc makes that far cheaper than
// glibc's allocator (BENCHMARKS.md, ingest).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    chartline::init_tracing(cli.log_json);
    let result = match cli.command {
        Command::Serve(args) => chartline::server::run(args).await,
        Command::Migrate(db) => chartline::server::migrate(&db).await,
        Command::Ingest(args) => chartline::ingest_cli::run(args).await,
        Command::Demo(args) => chartline::demo::run(args).await,
        Command::Prompt(args) => chartline::prompt_cli::run(args).await,
        Command::BenchPrompt(args) => chartline::bench_prompt::run(args).await,
        Command::BenchIngest(args) => chartline::bench::run(args).await,
        Command::BenchVision(args) => chartline::bench_vision::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chartline: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
