//! PostgreSQL storage for Chartline: resources and all their versions, the identifier
//! index, the `patient_event` timeline index and the ingest log. The only crate that
//! writes SQL. Migrations live in the repository's `migrations/` and are embedded here.

mod error;
mod outputs;
mod read;
mod timeline;
mod write;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use error::StoreError;
pub use outputs::{LeasedJob, NewOutput, OutputFilter, OutputRow, ProvenanceContent, ProvenanceRow};
pub use read::{IngestLogEntry, StoredResource};
pub use timeline::{EventFilter, EventRow};
pub use write::{IngestRecord, ResourceWrite, StoreTx, WriteOutcome, WriteResult};

/// The embedded migrations (`migrations/` at the repository root).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    summary_debounce: chrono::Duration,
}

/// How long a patient's summary job waits after the last change (a Bundle often arrives in
/// several requests; one summary after the burst, not one per request).
pub const DEFAULT_SUMMARY_DEBOUNCE: chrono::Duration = chrono::Duration::seconds(5);

impl Store {
    /// Connects to `database_url` with a pool of at most `max_connections`.
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new().max_connections(max_connections).connect(database_url).await?;
        Ok(Store { pool, summary_debounce: DEFAULT_SUMMARY_DEBOUNCE })
    }

    /// Sets the summary-job debounce.
    pub fn with_summary_debounce(mut self, debounce: chrono::Duration) -> Self {
        self.summary_debounce = debounce;
        self
    }

    /// Wraps an existing pool (tests get one from `#[sqlx::test]`).
    pub fn from_pool(pool: PgPool) -> Self {
        Store { pool, summary_debounce: DEFAULT_SUMMARY_DEBOUNCE }
    }

    /// The pool, for crates that add their own tables through this one later.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Starts a write transaction.
    pub async fn begin(&self) -> Result<StoreTx, StoreError> {
        Ok(StoreTx::new(self.pool.begin().await?, self.summary_debounce))
    }
}
