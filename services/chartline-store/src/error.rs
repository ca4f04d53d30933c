//! Storage errors.

/// A storage failure. Never carries resource content.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or refused.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Stored JSON could not be decoded (should not happen).
    #[error("stored content is not valid JSON: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Deadlock or serialization failure: the whole transaction may be retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }
}
