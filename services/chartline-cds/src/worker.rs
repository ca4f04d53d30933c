//! The summary worker: takes due jobs with `FOR UPDATE SKIP LOCKED` leases, summarizes,
//! and completes the job in the output's own transaction. A crash (even `kill -9`) leaves
//! the lease to expire and the job to be retaken; the output is stored at most once because
//! it commits together with the job's completion.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::summary::{SummaryError, Summarizer};

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Name in `summary_job.leased_by`.
    pub worker_id: String,
    /// How long a lease lasts before another worker may retake the job.
    pub lease: chrono::Duration,
    /// Pause between polls when no job is due.
    pub idle: Duration,
}

/// Runs until `shutdown` is cancelled.
pub async fn run(summarizer: Summarizer, config: WorkerConfig, shutdown: CancellationToken) {
    tracing::info!(worker = %config.worker_id, "summary worker started");
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let job = match summarizer.store().lease_job(&config.worker_id, config.lease).await {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "could not lease a summary job");
                None
            }
        };
        let Some(job) = job else {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(config.idle) => continue,
            }
        };
        tracing::info!(patient_id = %job.patient_id, attempt = job.attempts, "summary job leased");
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = summarizer.summarize(&job.patient_id, "summary-worker", Some(&job)) => r,
        };
        if let Err(e) = result {
            let reason = match &e {
                SummaryError::NotFound => "patient not found".to_owned(),
                SummaryError::Upstream(s) => format!("{:?}: {}", s.code(), s.message()),
                SummaryError::Store(_) => "storage failure".to_owned(),
            };
            tracing::warn!(patient_id = %job.patient_id, attempt = job.attempts, reason = %reason, "summary job failed; backing off");
            if let Err(e) = summarizer.store().fail_job(&job, &reason).await {
                tracing::error!(error = %e, "could not release a failed job");
            }
        }
    }
    tracing::info!(worker = %config.worker_id, "summary worker stopped");
}
