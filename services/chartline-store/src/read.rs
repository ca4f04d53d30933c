//! Reads: current versions, specific versions, history, a patient's compartment.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;

use crate::{Store, StoreError};

/// One stored version of a resource.
#[derive(Debug, Clone)]
pub struct StoredResource {
    /// The resource type.
    pub resource_type: String,
    /// The logical id.
    pub id: String,
    /// The version number (1, 2, …).
    pub version_id: i64,
    /// When the version was stored.
    pub last_updated: DateTime<Utc>,
    /// The content as stored (None for a deleted version).
    pub content: Option<Value>,
}

/// One row of the ingest log.
#[derive(Debug, Clone)]
pub struct IngestLogEntry {
    /// Row id.
    pub id: i64,
    /// Who sent it.
    pub sender: String,
    /// rest, grpc, cli.
    pub channel: String,
    /// transaction, batch, resource, ndjson.
    pub kind: String,
    /// stored, rejected, partial.
    pub outcome: String,
    /// Counts.
    pub created: i32,
    /// Counts.
    pub updated: i32,
    /// Counts.
    pub unchanged: i32,
    /// Counts.
    pub rejected: i32,
}

fn stored(row: &sqlx::postgres::PgRow) -> Result<StoredResource, StoreError> {
    Ok(StoredResource {
        resource_type: row.try_get("resource_type")?,
        id: row.try_get("id")?,
        version_id: row.try_get("version_id")?,
        last_updated: row.try_get("last_updated")?,
        content: content(row)?,
    })
}

/// A version's content column (JSON text; null for a deleted version), decoded.
pub(crate) fn content(row: &sqlx::postgres::PgRow) -> Result<Option<Value>, StoreError> {
    row.try_get::<Option<&str>, _>("content")?
        .map(|text| serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string())))
        .transpose()
}

impl Store {
    /// The current version, if the resource exists (a deleted one comes back with no content).
    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Option<StoredResource>, StoreError> {
        let row = sqlx::query(
            "select h.resource_type, h.id, h.version_id, h.last_updated, h.content
             from resource r join resource_history h using (resource_type, id, version_id)
             where r.resource_type = $1 and r.id = $2",
        )
        .bind(resource_type)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(stored).transpose()
    }

    /// One specific version.
    pub async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version_id: i64,
    ) -> Result<Option<StoredResource>, StoreError> {
        let row = sqlx::query(
            "select resource_type, id, version_id, last_updated, content from resource_history
             where resource_type = $1 and id = $2 and version_id = $3",
        )
        .bind(resource_type)
        .bind(id)
        .bind(version_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(stored).transpose()
    }

    /// Every version, newest first.
    pub async fn history(&self, resource_type: &str, id: &str) -> Result<Vec<StoredResource>, StoreError> {
        let rows = sqlx::query(
            "select resource_type, id, version_id, last_updated, content from resource_history
             where resource_type = $1 and id = $2 order by version_id desc",
        )
        .bind(resource_type)
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored).collect()
    }

    /// The current, non-deleted versions of every resource in a patient's compartment,
    /// the Patient first, then by type and id.
    pub async fn compartment(&self, patient_id: &str) -> Result<Vec<StoredResource>, StoreError> {
        let rows = sqlx::query(
            "select h.resource_type, h.id, h.version_id, h.last_updated, h.content
             from resource r join resource_history h using (resource_type, id, version_id)
             where r.patient_id = $1 and not r.deleted
             order by r.resource_type <> 'Patient', r.resource_type, r.id",
        )
        .bind(patient_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored).collect()
    }

    /// Current versions of the given (type, id) pairs that exist and are not deleted.
    pub async fn read_many(&self, keys: &[(String, String)]) -> Result<Vec<StoredResource>, StoreError> {
        let (types, ids): (Vec<&str>, Vec<&str>) = keys.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
        let rows = sqlx::query(
            "select h.resource_type, h.id, h.version_id, h.last_updated, h.content
             from unnest($1::text[], $2::text[]) as k(resource_type, id)
             join resource r using (resource_type, id)
             join resource_history h using (resource_type, id, version_id)
             where not r.deleted order by h.resource_type, h.id",
        )
        .bind(&types)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored).collect()
    }

    /// The newest ingest log rows, newest first.
    pub async fn ingest_log(&self, limit: i64) -> Result<Vec<IngestLogEntry>, StoreError> {
        let rows = sqlx::query(
            "select id, sender, channel, kind, outcome, created, updated, unchanged, rejected
             from ingest_log order by id desc limit $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(IngestLogEntry {
                    id: r.try_get("id")?,
                    sender: r.try_get("sender")?,
                    channel: r.try_get("channel")?,
                    kind: r.try_get("kind")?,
                    outcome: r.try_get("outcome")?,
                    created: r.try_get("created")?,
                    updated: r.try_get("updated")?,
                    unchanged: r.try_get("unchanged")?,
                    rejected: r.try_get("rejected")?,
                })
            })
            .collect()
    }

    /// Opens a committed ingest log row for a request whose parts commit separately
    /// (batch Bundles, NDJSON); close it with [`Store::close_ingest`].
    pub async fn open_ingest(&self, record: &crate::IngestRecord) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "insert into ingest_log (sender, channel, kind, payload_bytes, payload_sha256, outcome)
             values ($1, $2, $3, $4, $5, 'processing') returning id",
        )
        .bind(&record.sender)
        .bind(&record.channel)
        .bind(&record.kind)
        .bind(record.payload_bytes)
        .bind(&record.payload_sha256[..])
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("id")?)
    }

    /// Closes a row opened by [`Store::open_ingest`] with its counts.
    pub async fn close_ingest(
        &self,
        ingest_id: i64,
        counts: [i32; 4],
        issues: Option<&Value>,
    ) -> Result<(), StoreError> {
        let [created, updated, unchanged, rejected] = counts;
        sqlx::query(
            "update ingest_log set created = $2, updated = $3, unchanged = $4, rejected = $5, issues = $6,
                outcome = case when $5 = 0 then 'stored' when $2 + $3 + $4 = 0 then 'rejected' else 'partial' end
             where id = $1",
        )
        .bind(ingest_id)
        .bind(created)
        .bind(updated)
        .bind(unchanged)
        .bind(rejected)
        .bind(issues.map(sqlx::types::Json))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The ingest benchmark's floor: a bare `COPY` of JSON documents into a one-column
    /// jsonb table (created fresh, dropped after). Returns the documents copied.
    pub async fn copy_jsonb_floor(&self, docs: &[String]) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("drop table if exists bench_copy_floor").execute(&mut *conn).await?;
        sqlx::query("create table bench_copy_floor (content jsonb not null)").execute(&mut *conn).await?;
        let mut copy = conn.copy_in_raw("copy bench_copy_floor (content) from stdin").await?;
        let mut buf = Vec::with_capacity(1 << 20);
        for d in docs {
            // COPY text format: backslash is the escape character; compact JSON has no raw newlines.
            for b in d.bytes() {
                if b == b'\\' {
                    buf.push(b'\\');
                }
                buf.push(b);
            }
            buf.push(b'\n');
            if buf.len() >= 1 << 20 {
                copy.send(std::mem::take(&mut buf)).await?;
            }
        }
        if !buf.is_empty() {
            copy.send(buf).await?;
        }
        let n = copy.finish().await?;
        sqlx::query("drop table bench_copy_floor").execute(&mut *conn).await?;
        Ok(n)
    }

    /// How many resources are stored (current, not deleted).
    pub async fn count_current_resources(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("select count(*) from resource where not deleted").fetch_one(&self.pool).await?)
    }

    /// Empties the ingest tables between benchmark runs. Refuses unless the database is a
    /// benchmark's own (`chartline_bench…`, as scripts/bench-ingest.sh names it).
    pub async fn reset_benchmark_database(&self) -> Result<(), StoreError> {
        let name: String = sqlx::query_scalar("select current_database()").fetch_one(&self.pool).await?;
        if !name.starts_with("chartline_bench") {
            return Err(StoreError::Corrupt(format!("refusing to empty database {name}: not a benchmark database")));
        }
        sqlx::query("truncate resource, resource_history, resource_identifier, patient_event, ingest_log, summary_job restart identity")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records an ingest that stored nothing (rejected before or during its transaction).
    pub async fn log_rejection(&self, record: &crate::IngestRecord, issues: &Value) -> Result<(), StoreError> {
        sqlx::query(
            "insert into ingest_log (sender, channel, kind, payload_bytes, payload_sha256, outcome, rejected, issues)
             values ($1, $2, $3, $4, $5, 'rejected', $6, $7)",
        )
        .bind(&record.sender)
        .bind(&record.channel)
        .bind(&record.kind)
        .bind(record.payload_bytes)
        .bind(&record.payload_sha256[..])
        .bind(record.rejected.max(1))
        .bind(sqlx::types::Json(issues))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
