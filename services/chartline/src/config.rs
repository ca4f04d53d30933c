//! Command-line and environment configuration. Every field is `--flag` and an env var.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Chartline: FHIR ingest, patient timelines and audited AI chart summaries.
#[derive(Debug, Parser)]
#[command(name = "chartline", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log as JSON lines (for log shippers) instead of text.
    #[arg(long, env = "CHARTLINE_LOG_JSON", global = true)]
    pub log_json: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC and HTTP servers.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate(DbArgs),
    /// Store FHIR files or folders (Bundles, single resources, .ndjson) and print counts.
    Ingest(IngestArgs),
    /// Start everything in one process, ingest the shipped fixture patients over the wire,
    /// and print what was stored.
    Demo(DemoArgs),
    /// Print a patient's prompt (the timeline's structured, cited, budgeted text).
    Prompt(PromptArgs),
    /// Measure BuildPrompt latency against the floor of one indexed SELECT.
    BenchPrompt(BenchPromptArgs),
    /// Measure ingest throughput over FHIR REST against a bare COPY floor (empty database).
    BenchIngest(BenchIngestArgs),
    /// Measure MedGemma 4B's vision tower on one 896x896 image against text prefill of the
    /// same number of soft tokens (random weights of the real shapes; CPU).
    BenchVision(BenchVisionArgs),
}

/// `chartline bench-vision`.
#[derive(Args, Debug, Clone)]
pub struct BenchVisionArgs {
    /// Timed runs (after no warm-up: each run is tens of seconds).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Type of the tower's weights: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// The database.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL (as sqlx-cli expects it).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "CHARTLINE_DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub db_max_connections: u32,
}

impl DbArgs {
    /// The URL with any password replaced, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.database_url)
    }
}

/// Replaces the password of a URL (`scheme://user:secret@host`) with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((userinfo, host)) = rest.split_once('@') else { return url.to_owned() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Bounds on client input.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest accepted request body in bytes (HTTP 413 past it).
    #[arg(long, env = "CHARTLINE_MAX_PAYLOAD_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Deepest accepted JSON nesting (values above 127 act as 127, the parser's own bound).
    #[arg(long, env = "CHARTLINE_MAX_JSON_DEPTH", default_value_t = 64)]
    pub max_json_depth: usize,
    /// Reject strings holding HTML tags (the reference validator's security checks).
    #[arg(long, env = "CHARTLINE_REJECT_HTML_IN_STRINGS")]
    pub reject_html_in_strings: bool,
    /// Threads that validate the entries of one large Bundle (32 entries or more)
    /// together; 0: as many as the machine has cores.
    #[arg(long, env = "CHARTLINE_VALIDATION_THREADS", default_value_t = 0)]
    pub validation_threads: usize,
}

impl LimitArgs {
    /// As the validator's limits.
    pub fn limits(&self) -> chartline_fhir::Limits {
        chartline_fhir::Limits {
            max_bytes: self.max_payload_bytes,
            max_depth: self.max_json_depth,
            reject_html_in_strings: self.reject_html_in_strings,
            validation_threads: self.validation_threads,
            ..chartline_fhir::Limits::default()
        }
    }
}

/// `chartline serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Database.
    #[command(flatten)]
    pub db: DbArgs,
    /// Input limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// gRPC listen address.
    #[arg(long, env = "CHARTLINE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// HTTP (FHIR REST) listen address.
    #[arg(long, env = "CHARTLINE_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// The model: a GGUF file, a Hugging Face safetensors folder, or `openai:URL#MODEL` for a
    /// remote OpenAI-compatible engine (API key from CHARTLINE_OPENAI_API_KEY).
    #[arg(long, env = "CHARTLINE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// The tokenizer that budgets prompts (a GGUF file, tokenizer.json or model folder);
    /// default: the model's own, or the embedded Gemma 3 tokenizer for a remote model.
    #[arg(long, env = "CHARTLINE_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// The text embedding model folder (skipped when absent).
    #[arg(long, env = "CHARTLINE_EMBEDDING_MODEL", default_value = DEFAULT_EMBEDDING_MODEL)]
    pub embedding_model: PathBuf,
    /// The image-text model folder: a SigLIP dual encoder (MedSigLIP) for EmbedImage and
    /// Classify. None by default.
    #[arg(long, env = "CHARTLINE_IMAGE_MODEL")]
    pub image_model: Option<PathBuf>,
    /// Images from the chart attached to a summary prompt when the model takes images
    /// (a multimodal checkpoint); 0 sends none, at most 16 (what Generate takes).
    #[arg(long, env = "CHARTLINE_SUMMARY_MAX_IMAGES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub summary_max_images: u32,
    /// Summary workers in this process (0 to run none).
    #[arg(long, env = "CHARTLINE_SUMMARY_WORKERS", default_value_t = 1)]
    pub summary_workers: usize,
    /// Seconds a summary job lease lasts before another worker may retake it.
    #[arg(long, env = "CHARTLINE_JOB_LEASE_SECS", default_value_t = 120)]
    pub job_lease_secs: i64,
    /// Milliseconds a patient's summary job waits after the last change to its data.
    #[arg(long, env = "CHARTLINE_SUMMARY_DEBOUNCE_MS", default_value_t = 5000)]
    pub summary_debounce_ms: i64,
    /// Prompt budget of a summary, in tokens.
    #[arg(long, env = "CHARTLINE_SUMMARY_TOKEN_BUDGET", default_value_t = 3000)]
    pub summary_token_budget: i32,
    /// Tokens a summary may generate.
    #[arg(long, env = "CHARTLINE_SUMMARY_MAX_TOKENS", default_value_t = 200)]
    pub summary_max_tokens: u32,
    /// Base URL for links in CDS cards (as the EHR reaches Chartline).
    #[arg(long, env = "CHARTLINE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Largest chart attachment (image) the timeline serves or attaches to a prompt, in bytes;
    /// GetAttachment answers RESOURCE_EXHAUSTED past it.
    #[arg(long, env = "CHARTLINE_MAX_ATTACHMENT_BYTES", default_value_t = chartline_timeline::DEFAULT_MAX_ATTACHMENT_BYTES)]
    pub max_attachment_bytes: u64,
}

/// The embedded default embedding model.
pub const DEFAULT_EMBEDDING_MODEL: &str = "models/all-minilm-l6-v2";

/// The embedded default model, as scripts/install-models.sh installs it.
pub const DEFAULT_MODEL: &str = "models/gemma3-270m/gemma-3-270m-q4_k_m.gguf";

/// `chartline ingest`.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Database.
    #[command(flatten)]
    pub db: DbArgs,
    /// Input limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Sender recorded in the ingest log.
    #[arg(long, env = "CHARTLINE_SENDER", default_value = "cli")]
    pub sender: String,
    /// Files or folders (folders are read in Synthea's load order: hospital and practitioner
    /// Bundles first).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// `chartline demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Database.
    #[command(flatten)]
    pub db: DbArgs,
    /// The fixture folder holding Synthea Bundles.
    #[arg(long, env = "CHARTLINE_DEMO_FIXTURES", default_value = "../shared/fixtures/synthea/blaze-synthea-2.7.0")]
    pub fixtures: PathBuf,
    /// The patient to show.
    #[arg(long, default_value = "4b86befa-fa7e-9285-615f-e081dab3f93c")]
    pub patient: String,
    /// The model (GGUF file or Hugging Face folder).
    #[arg(long, env = "CHARTLINE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Prompt budget of the summary, in tokens.
    #[arg(long, default_value_t = 2000)]
    pub token_budget: i32,
    /// Tokens the summary may generate.
    #[arg(long, default_value_t = 160)]
    pub max_tokens: u32,
}

/// `chartline prompt`.
#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// Database.
    #[command(flatten)]
    pub db: DbArgs,
    /// The patient id.
    pub patient: String,
    /// Token budget.
    #[arg(long, default_value_t = 4000)]
    pub budget: i64,
    /// Task.
    #[arg(long, default_value = "chart_summary")]
    pub task: String,
    /// Read the chart as of this RFC 3339 time (default now).
    #[arg(long)]
    pub as_of: Option<String>,
    /// The model whose tokenizer counts.
    #[arg(long, env = "CHARTLINE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
}

/// `chartline bench-prompt`.
#[derive(Debug, Clone, Args)]
pub struct BenchPromptArgs {
    /// Database (the fixtures are loaded if the patient is missing).
    #[command(flatten)]
    pub db: DbArgs,
    /// The patient (default: the largest fixture patient, 3,177 resources).
    #[arg(long, default_value = "4b86befa-fa7e-9285-615f-e081dab3f93c")]
    pub patient: String,
    /// Token budget.
    #[arg(long, default_value_t = 4000)]
    pub budget: i64,
    /// Measured iterations.
    #[arg(long, default_value_t = 200)]
    pub iterations: usize,
    /// The fixture folder to load when the patient is missing.
    #[arg(long, default_value = "../shared/fixtures/synthea/blaze-synthea-2.7.0")]
    pub fixtures: PathBuf,
    /// The model whose tokenizer counts.
    #[arg(long, env = "CHARTLINE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
}

/// `chartline bench-ingest`.
#[derive(Debug, Clone, Args)]
pub struct BenchIngestArgs {
    /// Database (must be empty: the benchmark measures first loads).
    #[command(flatten)]
    pub db: DbArgs,
    /// The fixture folder holding Synthea Bundles.
    #[arg(long, default_value = "../shared/fixtures/synthea/blaze-synthea-2.7.0")]
    pub fixtures: PathBuf,
    /// Concurrent HTTP clients sending patient Bundles.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Runs of both the floor and Chartline (the tables are emptied between runs); the
    /// ratio is taken of the medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The model (its tokenizer is loaded as `serve` does).
    #[arg(long, env = "CHARTLINE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_flags_reach_the_validators_limits() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            limits: LimitArgs,
        }
        let defaults = Cli::parse_from(["chartline"]).limits.limits();
        assert_eq!((defaults.max_depth, defaults.validation_threads), (64, 0));
        let set = Cli::parse_from(["chartline", "--max-json-depth", "20", "--validation-threads", "1"]).limits.limits();
        assert_eq!((set.max_depth, set.validation_threads), (20, 1));
    }

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(redact_url("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
    }
}
