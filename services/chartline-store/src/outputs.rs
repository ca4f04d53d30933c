//! AI outputs, their hash-chained provenance, the summary job queue and CDS feedback.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::Row;
use uuid::Uuid;

use crate::{ResourceWrite, Store, StoreError};

/// An output to store.
#[derive(Debug, Clone)]
pub struct NewOutput {
    /// Output id (also the Composition id).
    pub id: Uuid,
    /// The patient.
    pub patient_id: String,
    /// The task (`chart_summary`).
    pub task: String,
    /// The model's text.
    pub narrative: String,
    /// Deterministic sections `[{key, title, loinc, text}]`.
    pub sections: Value,
    /// Citation check per statement.
    pub statements: Value,
    /// Tags found in the narrative.
    pub citations_found: i32,
    /// Tags that the prompt cited.
    pub citations_verified: i32,
    /// Statements without a verified citation.
    pub unsupported_statements: i32,
    /// stop, length, stop_sequence.
    pub finish_reason: String,
    /// Newest change of the patient's data the output saw.
    pub data_as_of: Option<DateTime<Utc>>,
}

/// The provenance of an output: everything needed to audit and replay it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvenanceContent {
    /// Model name.
    pub model_name: String,
    /// gguf, safetensors, openai.
    pub backend: String,
    /// sha256 of the weights.
    pub weights_sha256: String,
    /// sha256 of the tokenizer.
    pub tokenizer_sha256: String,
    /// Prompt template version.
    pub template_version: String,
    /// sha256 of the prompt text.
    pub prompt_sha256: String,
    /// The prompt text as sent.
    pub prompt_text: String,
    /// `[{resource_type, id, version_id}]`, sorted.
    pub inputs: Value,
    /// Generation parameters, seed included.
    pub parameters: Value,
    /// Who asked (user, client, `summary-worker`).
    pub requester: String,
    /// Generation start.
    pub started_at: DateTime<Utc>,
    /// Generation end.
    pub finished_at: DateTime<Utc>,
    /// Milliseconds.
    pub latency_ms: i64,
    /// sha256 of the output text, hex.
    pub output_sha256: String,
}

impl ProvenanceContent {
    /// sha256 of the canonical JSON of this content and its output id: what the chain links.
    pub fn content_sha256(&self, output_id: Uuid) -> [u8; 32] {
        let ts = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        // serde_json's Map is sorted by key, so this serialization is canonical.
        let v = serde_json::json!({
            "output_id": output_id.to_string(),
            "model_name": self.model_name,
            "backend": self.backend,
            "weights_sha256": self.weights_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "template_version": self.template_version,
            "prompt_sha256": self.prompt_sha256,
            "prompt_text": self.prompt_text,
            "inputs": self.inputs,
            "parameters": self.parameters,
            "requester": self.requester,
            "started_at": ts(&self.started_at),
            "finished_at": ts(&self.finished_at),
            "latency_ms": self.latency_ms,
            "output_sha256": self.output_sha256,
        });
        Sha256::digest(v.to_string().as_bytes()).into()
    }
}

/// A stored provenance row.
#[derive(Debug, Clone)]
pub struct ProvenanceRow {
    /// Position in the chain (1, 2, …).
    pub seq: i64,
    /// The output.
    pub output_id: Uuid,
    /// The content.
    pub content: ProvenanceContent,
    /// Stored hash of the content.
    pub content_sha256: Vec<u8>,
    /// Stored hash of the previous row.
    pub prev_hash: Vec<u8>,
    /// Stored hash of this row: sha256(prev_hash ‖ content_sha256).
    pub row_hash: Vec<u8>,
}

/// A stored output.
#[derive(Debug, Clone)]
pub struct OutputRow {
    /// Output id.
    pub id: Uuid,
    /// Patient.
    pub patient_id: String,
    /// Task.
    pub task: String,
    /// The model's text.
    pub narrative: String,
    /// Deterministic sections.
    pub sections: Value,
    /// Per-statement citation check.
    pub statements: Value,
    /// Counts.
    pub citations_found: i32,
    /// Counts.
    pub citations_verified: i32,
    /// Counts.
    pub unsupported_statements: i32,
    /// sha256 of the narrative.
    pub output_sha256: Vec<u8>,
    /// Finish reason.
    pub finish_reason: String,
    /// When stored.
    pub created_at: DateTime<Utc>,
}

/// Which outputs to list.
#[derive(Debug, Clone, Default)]
pub struct OutputFilter {
    /// Only this patient.
    pub patient_id: Option<String>,
    /// Only this model name.
    pub model_name: Option<String>,
    /// Created at or after.
    pub from: Option<DateTime<Utc>>,
    /// Created at or before.
    pub to: Option<DateTime<Utc>>,
    /// At most this many (newest first).
    pub limit: i64,
}

/// A leased summary job.
#[derive(Debug, Clone)]
pub struct LeasedJob {
    /// The patient to summarize.
    pub patient_id: String,
    /// The generation leased; the job is deleted on success only if it is still current.
    pub generation: i64,
    /// Attempts so far, this one included.
    pub attempts: i32,
}

const GENESIS: [u8; 32] = [0; 32];
/// Advisory lock key serializing appends to the provenance chain.
const CHAIN_LOCK: i64 = 0x6368_6169_6e5f_7076;

fn output_row(r: &sqlx::postgres::PgRow) -> Result<OutputRow, StoreError> {
    Ok(OutputRow {
        id: r.try_get("id")?,
        patient_id: r.try_get("patient_id")?,
        task: r.try_get("task")?,
        narrative: r.try_get("narrative")?,
        sections: r.try_get::<sqlx::types::Json<Value>, _>("sections")?.0,
        statements: r.try_get::<sqlx::types::Json<Value>, _>("statements")?.0,
        citations_found: r.try_get("citations_found")?,
        citations_verified: r.try_get("citations_verified")?,
        unsupported_statements: r.try_get("unsupported_statements")?,
        output_sha256: r.try_get("output_sha256")?,
        finish_reason: r.try_get("finish_reason")?,
        created_at: r.try_get("created_at")?,
    })
}

fn provenance_row(r: &sqlx::postgres::PgRow) -> Result<ProvenanceRow, StoreError> {
    Ok(ProvenanceRow {
        seq: r.try_get("seq")?,
        output_id: r.try_get("output_id")?,
        content: ProvenanceContent {
            model_name: r.try_get("model_name")?,
            backend: r.try_get("backend")?,
            weights_sha256: r.try_get("weights_sha256")?,
            tokenizer_sha256: r.try_get("tokenizer_sha256")?,
            template_version: r.try_get("template_version")?,
            prompt_sha256: r.try_get("prompt_sha256")?,
            prompt_text: r.try_get("prompt_text")?,
            inputs: r.try_get::<sqlx::types::Json<Value>, _>("inputs")?.0,
            parameters: r.try_get::<sqlx::types::Json<Value>, _>("parameters")?.0,
            requester: r.try_get("requester")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            latency_ms: r.try_get("latency_ms")?,
            output_sha256: r.try_get("output_sha256")?,
        },
        content_sha256: r.try_get("content_sha256")?,
        prev_hash: r.try_get("prev_hash")?,
        row_hash: r.try_get("row_hash")?,
    })
}

impl Store {
    /// Stores an output, its provenance (appended to the chain) and its FHIR face
    /// (Composition, Provenance, Device, DocumentReferences) in one transaction; with a
    /// leased job, completes it in the same transaction (deleted unless newer data came).
    /// Returns the provenance row's position in the chain.
    pub async fn store_output(
        &self,
        output: &NewOutput,
        provenance: &ProvenanceContent,
        fhir: Vec<ResourceWrite>,
        job: Option<&LeasedJob>,
    ) -> Result<i64, StoreError> {
        let mut tx = self.begin().await?;
        // The Composition and Provenance are the summary itself, not new data about the patient.
        tx.suppress_summary_jobs();
        let output_sha: [u8; 32] = Sha256::digest(output.narrative.as_bytes()).into();
        sqlx::query(
            "insert into ai_output (id, patient_id, task, narrative, sections, statements, citations_found,
                citations_verified, unsupported_statements, output_sha256, finish_reason, data_as_of)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(output.id)
        .bind(&output.patient_id)
        .bind(&output.task)
        .bind(&output.narrative)
        .bind(sqlx::types::Json(&output.sections))
        .bind(sqlx::types::Json(&output.statements))
        .bind(output.citations_found)
        .bind(output.citations_verified)
        .bind(output.unsupported_statements)
        .bind(&output_sha[..])
        .bind(&output.finish_reason)
        .bind(output.data_as_of)
        .execute(tx.conn())
        .await?;
        sqlx::query("select pg_advisory_xact_lock($1)").bind(CHAIN_LOCK).execute(tx.conn()).await?;
        let prev: Option<Vec<u8>> = sqlx::query_scalar("select row_hash from provenance order by seq desc limit 1")
            .fetch_optional(tx.conn())
            .await?;
        let prev = prev.unwrap_or_else(|| GENESIS.to_vec());
        let content = provenance.content_sha256(output.id);
        let row_hash: [u8; 32] = Sha256::new().chain_update(&prev).chain_update(content).finalize().into();
        let p = provenance;
        let seq: i64 = sqlx::query_scalar(
            "insert into provenance (output_id, model_name, backend, weights_sha256, tokenizer_sha256, template_version,
                prompt_sha256, prompt_text, inputs, parameters, requester, started_at, finished_at, latency_ms,
                output_sha256, content_sha256, prev_hash, row_hash)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) returning seq",
        )
        .bind(output.id)
        .bind(&p.model_name)
        .bind(&p.backend)
        .bind(&p.weights_sha256)
        .bind(&p.tokenizer_sha256)
        .bind(&p.template_version)
        .bind(&p.prompt_sha256)
        .bind(&p.prompt_text)
        .bind(sqlx::types::Json(&p.inputs))
        .bind(sqlx::types::Json(&p.parameters))
        .bind(&p.requester)
        .bind(p.started_at)
        .bind(p.finished_at)
        .bind(p.latency_ms)
        .bind(&p.output_sha256)
        .bind(&content[..])
        .bind(&prev)
        .bind(&row_hash[..])
        .fetch_one(tx.conn())
        .await?;
        tx.write(fhir, None).await?;
        // Delivered when (and only if) the transaction commits.
        sqlx::query("select pg_notify('summary_job', $1)").bind(format!("stored {}", output.patient_id)).execute(tx.conn()).await?;
        if let Some(job) = job {
            sqlx::query("delete from summary_job where patient_id = $1 and generation = $2")
                .bind(&job.patient_id)
                .bind(job.generation)
                .execute(tx.conn())
                .await?;
            sqlx::query("update summary_job set lease_until = null, leased_by = null where patient_id = $1")
                .bind(&job.patient_id)
                .execute(tx.conn())
                .await?;
        }
        tx.commit().await?;
        Ok(seq)
    }

    /// One output.
    pub async fn output(&self, id: Uuid) -> Result<Option<OutputRow>, StoreError> {
        let row = sqlx::query("select * from ai_output where id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(output_row).transpose()
    }

    /// The patient's newest output of a task.
    pub async fn latest_output(&self, patient_id: &str, task: &str) -> Result<Option<OutputRow>, StoreError> {
        let row = sqlx::query("select * from ai_output where patient_id = $1 and task = $2 order by created_at desc, id limit 1")
            .bind(patient_id)
            .bind(task)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(output_row).transpose()
    }

    /// Outputs, newest first, each with its provenance.
    pub async fn list_outputs(&self, f: &OutputFilter) -> Result<Vec<(OutputRow, ProvenanceRow)>, StoreError> {
        let rows = sqlx::query(
            "select o.* from ai_output o join provenance p on p.output_id = o.id
             where ($1::text is null or o.patient_id = $1) and ($2::text is null or p.model_name = $2)
               and ($3::timestamptz is null or o.created_at >= $3) and ($4::timestamptz is null or o.created_at <= $4)
             order by o.created_at desc, o.id limit $5",
        )
        .bind(&f.patient_id)
        .bind(&f.model_name)
        .bind(f.from)
        .bind(f.to)
        .bind(if f.limit <= 0 { 100 } else { f.limit.min(1000) })
        .fetch_all(&self.pool)
        .await?;
        let outputs: Vec<OutputRow> = rows.iter().map(output_row).collect::<Result<_, _>>()?;
        let ids: Vec<Uuid> = outputs.iter().map(|o| o.id).collect();
        let prov = sqlx::query("select * from provenance where output_id = any($1)").bind(&ids).fetch_all(&self.pool).await?;
        let mut by_id: std::collections::HashMap<Uuid, ProvenanceRow> =
            prov.iter().map(|r| provenance_row(r).map(|p| (p.output_id, p))).collect::<Result<_, _>>()?;
        outputs
            .into_iter()
            .map(|o| {
                let p = by_id.remove(&o.id).ok_or_else(|| StoreError::Corrupt(format!("output {} has no provenance", o.id)))?;
                Ok((o, p))
            })
            .collect()
    }

    /// The provenance of one output.
    pub async fn provenance_of(&self, output_id: Uuid) -> Result<Option<ProvenanceRow>, StoreError> {
        let row = sqlx::query("select * from provenance where output_id = $1").bind(output_id).fetch_optional(&self.pool).await?;
        row.as_ref().map(provenance_row).transpose()
    }

    /// The whole chain in order, with each output's current narrative hash (to catch an
    /// output edited after the fact).
    pub async fn provenance_chain(&self) -> Result<Vec<(ProvenanceRow, Option<Vec<u8>>)>, StoreError> {
        let rows = sqlx::query(
            "select p.*, o.output_sha256 as current_output_sha256, o.narrative
             from provenance p left join ai_output o on o.id = p.output_id order by p.seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let narrative: Option<String> = r.try_get("narrative")?;
                let recomputed = narrative.map(|n| Sha256::digest(n.as_bytes()).to_vec());
                Ok((provenance_row(r)?, recomputed))
            })
            .collect()
    }

    /// The genesis "previous hash" of the chain.
    pub fn chain_genesis() -> [u8; 32] {
        GENESIS
    }

    /// Leases the next due summary job (SKIP LOCKED: workers never wait on each other).
    pub async fn lease_job(&self, worker: &str, lease: chrono::Duration) -> Result<Option<LeasedJob>, StoreError> {
        let row = sqlx::query(
            "update summary_job set lease_until = now() + $2, leased_by = $1, attempts = attempts + 1
             where patient_id = (
                select patient_id from summary_job
                where not_before <= now() and (lease_until is null or lease_until < now())
                order by not_before, patient_id limit 1 for update skip locked)
             returning patient_id, generation, attempts",
        )
        .bind(worker)
        .bind(lease)
        .fetch_optional(&self.pool)
        .await?;
        let job = row
            .map(|r| Ok::<_, StoreError>(LeasedJob { patient_id: r.try_get("patient_id")?, generation: r.try_get("generation")?, attempts: r.try_get("attempts")? }))
            .transpose()?;
        if let Some(j) = &job {
            // Monitoring (and tests) can LISTEN summary_job instead of polling.
            sqlx::query("select pg_notify('summary_job', $1)").bind(format!("leased {}", j.patient_id)).execute(&self.pool).await?;
        }
        Ok(job)
    }

    /// Gives a failed job back with exponential backoff (capped), recording why.
    pub async fn fail_job(&self, job: &LeasedJob, error: &str) -> Result<(), StoreError> {
        let backoff = chrono::Duration::seconds(2_i64.saturating_pow(job.attempts.clamp(0, 10) as u32).min(600));
        sqlx::query(
            "update summary_job set lease_until = null, leased_by = null, last_error = $2, not_before = now() + $3
             where patient_id = $1",
        )
        .bind(&job.patient_id)
        .bind(error.chars().take(500).collect::<String>())
        .bind(backoff)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Enqueues a summary job for one patient now (a CDS request found no summary).
    pub async fn enqueue_summary_now(&self, patient_id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "insert into summary_job (patient_id, not_before) values ($1, now())
             on conflict (patient_id) do update set not_before = least(summary_job.not_before, now())",
        )
        .bind(patient_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Whether the patient has data not yet summarized (a pending job).
    pub async fn summary_pending(&self, patient_id: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar::<_, bool>("select exists (select 1 from summary_job where patient_id = $1)")
            .bind(patient_id)
            .fetch_one(&self.pool)
            .await?)
    }

    /// The newest change to the patient's own data.
    pub async fn patient_data_as_of(&self, patient_id: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar(
            "select max(last_updated) from resource where patient_id = $1
             and resource_type not in ('Composition', 'Provenance', 'Device')",
        )
        .bind(patient_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Stores CDS Hooks feedback.
    pub async fn store_feedback(
        &self,
        service_id: &str,
        card_uuid: &str,
        outcome: &str,
        outcome_timestamp: Option<DateTime<Utc>>,
        detail: &Value,
    ) -> Result<(), StoreError> {
        sqlx::query("insert into cds_feedback (service_id, card_uuid, outcome, outcome_timestamp, detail) values ($1, $2, $3, $4, $5)")
            .bind(service_id)
            .bind(card_uuid)
            .bind(outcome)
            .bind(outcome_timestamp)
            .bind(sqlx::types::Json(detail))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Current Provenance resources whose target is `reference` (`Composition/{id}`).
    pub async fn provenance_resources_for(&self, reference: &str) -> Result<Vec<Value>, StoreError> {
        let probe = serde_json::json!({"target": [{"reference": reference}]});
        // Content is JSON text: the substring test (the reference as JSON spells it) skips
        // the casts of unrelated Provenance.
        let spelled = serde_json::to_string(reference).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let rows: Vec<String> = sqlx::query_scalar(
            "select h.content from resource r join resource_history h using (resource_type, id, version_id)
             where r.resource_type = 'Provenance' and not r.deleted
               and strpos(h.content, $2) > 0 and h.content::jsonb @> $1 order by r.id",
        )
        .bind(sqlx::types::Json(probe))
        .bind(spelled.trim_matches('"'))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|t| serde_json::from_str(t).map_err(|e| StoreError::Corrupt(e.to_string()))).collect()
    }
}
