//! The write path: one `StoreTx` per ingest transaction, bulk statements over arrays so a
//! 3,000-resource Bundle costs a handful of round trips, not thousands.

use std::collections::{HashMap, HashSet};

use chartline_fhir::{CanonicalJson, PatientEvent};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sqlx::{Postgres, Row, Transaction};

use crate::StoreError;

/// Largest content per history INSERT (bytes of JSON text), and rows per timeline INSERT:
/// parameters stay in the allocators' reusable size classes instead of fresh multi-MB
/// buffers (measured in BENCHMARKS.md).
const STATEMENT_BYTES: usize = 256 * 1024;
const EVENT_ROWS: usize = 1000;

/// A resource ready to be stored: validated, id assigned, references resolved.
#[derive(Debug, Clone)]
pub struct ResourceWrite {
    /// The resource type.
    pub resource_type: String,
    /// The logical id.
    pub id: String,
    /// The content in canonical JSON, with its hash (`canonical.sha256()`); the store sets
    /// `meta.versionId` and `meta.lastUpdated` in the text it stores.
    pub canonical: CanonicalJson,
    /// Compartment owner.
    pub patient_id: Option<String>,
    /// Timeline rows (written only when `patient_id` is known).
    pub events: Vec<PatientEvent>,
    /// (system, value) identifiers.
    pub identifiers: Vec<(String, String)>,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// A new resource, version 1.
    Created,
    /// A new version of an existing resource.
    Updated,
    /// Identical content to the current version: nothing written.
    Unchanged,
}

impl WriteOutcome {
    /// `created`, `updated`, `unchanged`.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteOutcome::Created => "created",
            WriteOutcome::Updated => "updated",
            WriteOutcome::Unchanged => "unchanged",
        }
    }
}

/// The result of one resource write.
#[derive(Debug, Clone)]
pub struct WriteResult {
    /// The resource type.
    pub resource_type: String,
    /// The logical id.
    pub id: String,
    /// The current version after the write.
    pub version_id: i64,
    /// When that version was stored.
    pub last_updated: DateTime<Utc>,
    /// What happened.
    pub outcome: WriteOutcome,
}

/// The ingest log's view of one request.
#[derive(Debug, Clone)]
pub struct IngestRecord {
    /// Who sent it (client id, user, `cli`).
    pub sender: String,
    /// rest, grpc, cli.
    pub channel: String,
    /// transaction, batch, resource, ndjson.
    pub kind: String,
    /// Size of the payload.
    pub payload_bytes: i64,
    /// sha256 of the payload bytes.
    pub payload_sha256: [u8; 32],
    /// Entries rejected (batch and NDJSON can store some and reject others).
    pub rejected: i32,
}

/// An open write transaction. Dropped without [`StoreTx::commit`], it rolls back.
pub struct StoreTx {
    tx: Transaction<'static, Postgres>,
    /// Rows this transaction has locked and read, so that [`StoreTx::write`] does not look
    /// them up again. Cleared on rollback to a savepoint.
    locked: HashMap<(String, String), Current>,
    now: DateTime<Utc>,
    debounce: chrono::Duration,
    enqueue_jobs: bool,
}

struct Current {
    version_id: i64,
    last_updated: DateTime<Utc>,
    sha256: Vec<u8>,
    deleted: bool,
}

impl StoreTx {
    pub(crate) fn new(tx: Transaction<'static, Postgres>, debounce: chrono::Duration) -> Self {
        // Postgres keeps microseconds; truncating here keeps meta.lastUpdated and the row equal.
        let now = Utc::now();
        let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        StoreTx { tx, locked: HashMap::new(), now, debounce, enqueue_jobs: true }
    }

    /// Writes in this transaction enqueue no summary jobs (the summary's own resources).
    pub(crate) fn suppress_summary_jobs(&mut self) {
        self.enqueue_jobs = false;
    }

    pub(crate) fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }

    /// The transaction's timestamp, used as `lastUpdated` for everything it writes.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Serializes conditional creates of the same key across concurrent transactions.
    pub async fn lock_key(&mut self, key: &str) -> Result<(), StoreError> {
        sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))").bind(key).execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Serializes conditional creates and updates of the same keys across concurrent
    /// transactions: one statement for all of them, taken in sorted order (two requests
    /// that share keys then wait for each other instead of deadlocking).
    pub async fn lock_keys(&mut self, keys: &[String]) -> Result<(), StoreError> {
        let mut sorted: Vec<&str> = keys.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        match sorted.as_slice() {
            [] => {}
            [one] => self.lock_key(one).await?,
            _ => {
                // unnest yields the array in order: the locks are taken in that order.
                sqlx::query("select pg_advisory_xact_lock(hashtextextended(k, 0)) from unnest($1::text[]) as k")
                    .bind(&sorted)
                    .execute(&mut *self.tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// Ids of current, non-deleted resources with an identifier, for many (type, system,
    /// value) searches in one statement (`system` None matches any system): the matching
    /// ids of each, sorted, in the order asked.
    pub async fn find_by_identifiers(&mut self, searches: &[(&str, Option<&str>, &str)]) -> Result<Vec<Vec<String>>, StoreError> {
        let mut found = vec![Vec::new(); searches.len()];
        if searches.is_empty() {
            return Ok(found);
        }
        let n: Vec<i32> = (0..searches.len()).map(|i| i32::try_from(i).unwrap_or(i32::MAX)).collect();
        let types: Vec<&str> = searches.iter().map(|s| s.0).collect();
        let systems: Vec<Option<&str>> = searches.iter().map(|s| s.1).collect();
        let values: Vec<&str> = searches.iter().map(|s| s.2).collect();
        let rows = sqlx::query(
            "select distinct q.n, i.id
             from unnest($1::int[], $2::text[], $3::text[], $4::text[]) as q(n, t, s, v)
             join resource_identifier i on i.resource_type = q.t and i.value = q.v and (q.s is null or i.system = q.s)
             join resource r on r.resource_type = i.resource_type and r.id = i.id
             where not r.deleted
             order by q.n, i.id",
        )
        .bind(&n)
        .bind(&types)
        .bind(&systems)
        .bind(&values)
        .fetch_all(&mut *self.tx)
        .await?;
        for r in &rows {
            let n: i32 = r.try_get("n")?;
            if let Some(ids) = usize::try_from(n).ok().and_then(|n| found.get_mut(n)) {
                ids.push(r.try_get("id")?);
            }
        }
        Ok(found)
    }

    /// Which of the given (type, id) pairs exist and are not deleted.
    pub async fn existing(&mut self, keys: &[(String, String)]) -> Result<HashSet<(String, String)>, StoreError> {
        let (types, ids): (Vec<&str>, Vec<&str>) = keys.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
        let rows = sqlx::query(
            "select r.resource_type, r.id from unnest($1::text[], $2::text[]) as k(resource_type, id)
             join resource r using (resource_type, id) where not r.deleted",
        )
        .bind(&types)
        .bind(&ids)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("resource_type")?, r.try_get("id")?))).collect()
    }

    /// The canonical content hash of each current resource among `keys` (for deciding
    /// whether a POST with a client-chosen id is a re-send of the same content). The rows
    /// are locked and remembered: a following [`StoreTx::write`] of the same keys uses them.
    pub async fn current_hashes(&mut self, keys: &[(String, String)]) -> Result<HashMap<(String, String), Vec<u8>>, StoreError> {
        let (types, ids): (Vec<&str>, Vec<&str>) = keys.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
        let found = self.lock_current(&types, &ids).await?;
        let hashes = found.iter().filter(|(_, c)| !c.deleted).map(|(k, c)| (k.clone(), c.sha256.clone())).collect();
        self.locked.extend(found);
        Ok(hashes)
    }

    async fn lock_current(&mut self, types: &[&str], ids: &[&str]) -> Result<HashMap<(String, String), Current>, StoreError> {
        let rows = sqlx::query(
            "select r.resource_type, r.id, r.version_id, r.last_updated, r.sha256, r.deleted
             from resource r join unnest($1::text[], $2::text[]) as k(resource_type, id) using (resource_type, id)
             order by r.resource_type, r.id for update of r",
        )
        .bind(types)
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    (r.try_get("resource_type")?, r.try_get("id")?),
                    Current {
                        version_id: r.try_get("version_id")?,
                        last_updated: r.try_get("last_updated")?,
                        sha256: r.try_get("sha256")?, deleted: r.try_get("deleted")? },
                ))
            })
            .collect()
    }

    /// Stores the resources (each (type, id) at most once), creating, updating or leaving
    /// each unchanged, and keeps the identifier and timeline indexes in step. Results come
    /// back in input order.
    pub async fn write(&mut self, writes: Vec<ResourceWrite>, ingest_id: Option<i64>) -> Result<Vec<WriteResult>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let types: Vec<&str> = writes.iter().map(|w| w.resource_type.as_str()).collect();
        let ids: Vec<&str> = writes.iter().map(|w| w.id.as_str()).collect();
        let keys: Vec<(String, String)> = writes.iter().map(|w| (w.resource_type.clone(), w.id.clone())).collect();
        // Rows locked earlier in this transaction are known.
        let mut current: HashMap<&(String, String), Current> = HashMap::new();
        for key in &keys {
            if let Some(c) = self.locked.remove(key) {
                current.insert(key, c);
            }
        }

        // Try to create every other row: most writes are creates, and one INSERT that skips
        // existing keys is cheaper than looking them all up first. The keys that already
        // existed (or that a concurrent transaction created first: ON CONFLICT waits for it
        // and skips) are then locked and read, and become updates.
        let missing: Vec<usize> = (0..writes.len()).filter(|&i| !current.contains_key(&keys[i])).collect();
        let mut created = HashSet::new();
        if !missing.is_empty() {
            let mt: Vec<&str> = missing.iter().map(|&i| types[i]).collect();
            let mi: Vec<&str> = missing.iter().map(|&i| ids[i]).collect();
            let ms: Vec<&[u8]> = missing.iter().map(|&i| &writes[i].canonical.sha256()[..]).collect();
            let mp: Vec<Option<&str>> = missing.iter().map(|&i| writes[i].patient_id.as_deref()).collect();
            let rows = sqlx::query(
                "insert into resource (resource_type, id, version_id, last_updated, sha256, patient_id)
                 select t, i, 1, $5, s, p from unnest($1::text[], $2::text[], $3::bytea[], $4::text[]) as x(t, i, s, p)
                 order by t, i
                 on conflict (resource_type, id) do nothing returning resource_type, id",
            )
            .bind(&mt)
            .bind(&mi)
            .bind(&ms)
            .bind(&mp)
            .bind(self.now)
            .fetch_all(&mut *self.tx)
            .await?;
            for r in &rows {
                created.insert((r.try_get::<String, _>("resource_type")?, r.try_get::<String, _>("id")?));
            }
            if created.len() < missing.len() {
                let existed: Vec<usize> = missing.iter().copied().filter(|&i| !created.contains(&keys[i])).collect();
                let lt: Vec<&str> = existed.iter().map(|&i| types[i]).collect();
                let li: Vec<&str> = existed.iter().map(|&i| ids[i]).collect();
                let mut found = self.lock_current(&lt, &li).await?;
                for &i in &existed {
                    if let Some(c) = found.remove(&keys[i]) {
                        current.insert(&keys[i], c);
                    }
                }
            }
        }

        let mut results = Vec::with_capacity(writes.len());
        let mut changed: Vec<(usize, i64)> = Vec::new();
        for (i, (w, key)) in writes.iter().zip(&keys).enumerate() {
            let (outcome, version_id, last_updated) = if created.contains(key) {
                (WriteOutcome::Created, 1, self.now)
            } else if let Some(c) = current.get(key) {
                if !c.deleted && c.sha256 == w.canonical.sha256() {
                    (WriteOutcome::Unchanged, c.version_id, c.last_updated)
                } else {
                    (WriteOutcome::Updated, c.version_id + 1, self.now)
                }
            } else {
                return Err(StoreError::Corrupt(format!("{}/{} neither created nor found", w.resource_type, w.id)));
            };
            if outcome != WriteOutcome::Unchanged {
                changed.push((i, version_id));
            }
            results.push(WriteResult {
                resource_type: w.resource_type.clone(),
                id: w.id.clone(),
                version_id,
                last_updated,
                outcome,
            });
        }
        if changed.is_empty() {
            return Ok(results);
        }

        let updated: Vec<usize> =
            changed.iter().filter(|(i, _)| results[*i].outcome == WriteOutcome::Updated).map(|(i, _)| *i).collect();
        if !updated.is_empty() {
            let ut: Vec<&str> = updated.iter().map(|&i| types[i]).collect();
            let ui: Vec<&str> = updated.iter().map(|&i| ids[i]).collect();
            let uv: Vec<i64> = updated.iter().map(|&i| results[i].version_id).collect();
            let us: Vec<&[u8]> = updated.iter().map(|&i| &writes[i].canonical.sha256()[..]).collect();
            let up: Vec<Option<&str>> = updated.iter().map(|&i| writes[i].patient_id.as_deref()).collect();
            sqlx::query(
                "update resource r set version_id = x.v, sha256 = x.s, patient_id = x.p, last_updated = $6, deleted = false
                 from unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[], $5::text[]) as x(t, i, v, s, p)
                 where r.resource_type = x.t and r.id = x.i",
            )
            .bind(&ut)
            .bind(&ui)
            .bind(&uv)
            .bind(&us)
            .bind(&up)
            .bind(self.now)
            .execute(&mut *self.tx)
            .await?;
            sqlx::query(
                "delete from patient_event e using unnest($1::text[], $2::text[]) as x(t, i)
                 where e.resource_type = x.t and e.resource_id = x.i",
            )
            .bind(&ut)
            .bind(&ui)
            .execute(&mut *self.tx)
            .await?;
            sqlx::query(
                "delete from resource_identifier d using unnest($1::text[], $2::text[]) as x(t, i)
                 where d.resource_type = x.t and d.id = x.i",
            )
            .bind(&ut)
            .bind(&ui)
            .execute(&mut *self.tx)
            .await?;
        }

        // History rows: the content with server-managed meta, as JSON text. Sent in
        // statements of a bounded size: a 6 MB Bundle in one array parameter makes a buffer
        // that grows by doubling into fresh memory on both sides of the connection.
        let last_updated = self.now.to_rfc3339_opts(SecondsFormat::Micros, true);
        let texts: Vec<String> =
            changed.iter().map(|&(i, v)| writes[i].canonical.with_server_meta(&v.to_string(), &last_updated)).collect();
        let mut start = 0;
        while start < changed.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < changed.len() && (end == start || bytes + texts[end].len() <= STATEMENT_BYTES) {
                bytes += texts[end].len();
                end += 1;
            }
            let part = &changed[start..end];
            let ht: Vec<&str> = part.iter().map(|&(i, _)| writes[i].resource_type.as_str()).collect();
            let hi: Vec<&str> = part.iter().map(|&(i, _)| writes[i].id.as_str()).collect();
            let hv: Vec<i64> = part.iter().map(|&(_, v)| v).collect();
            let hs: Vec<&[u8]> = part.iter().map(|&(i, _)| &writes[i].canonical.sha256()[..]).collect();
            let hp: Vec<Option<&str>> = part.iter().map(|&(i, _)| writes[i].patient_id.as_deref()).collect();
            sqlx::query(
                "insert into resource_history (resource_type, id, version_id, last_updated, sha256, content, patient_id, ingest_id)
                 select t, i, v, $7, s, c, p, $8
                 from unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[], $5::text[], $6::text[]) as x(t, i, v, s, c, p)",
            )
            .bind(&ht)
            .bind(&hi)
            .bind(&hv)
            .bind(&hs)
            .bind(&texts[start..end])
            .bind(&hp)
            .bind(self.now)
            .bind(ingest_id)
            .execute(&mut *self.tx)
            .await?;
            start = end;
        }

        self.insert_identifiers(&writes, &changed).await?;
        self.insert_events(&writes, &changed).await?;
        let mut patients: Vec<&str> = changed.iter().filter_map(|&(i, _)| writes[i].patient_id.as_deref()).collect();
        patients.sort_unstable();
        patients.dedup();
        self.enqueue_summaries(&patients).await?;
        Ok(results)
    }

    async fn insert_identifiers(&mut self, writes: &[ResourceWrite], changed: &[(usize, i64)]) -> Result<(), StoreError> {
        let (mut t, mut id, mut sys, mut val) = (vec![], vec![], vec![], vec![]);
        for &(i, _) in changed {
            let w = &writes[i];
            for (s, v) in &w.identifiers {
                t.push(w.resource_type.as_str());
                id.push(w.id.as_str());
                sys.push(s.as_str());
                val.push(v.as_str());
            }
        }
        if t.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "insert into resource_identifier (resource_type, id, system, value)
             select * from unnest($1::text[], $2::text[], $3::text[], $4::text[])",
        )
        .bind(&t)
        .bind(&id)
        .bind(&sys)
        .bind(&val)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn insert_events(&mut self, writes: &[ResourceWrite], changed: &[(usize, i64)]) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        for &(i, v) in changed {
            let w = &writes[i];
            let Some(patient) = w.patient_id.as_deref() else { continue };
            rows.extend(w.events.iter().map(|e| (patient, w, v, e)));
        }
        for part in rows.chunks(EVENT_ROWS) {
            let mut c = EventColumns::default();
            for &(patient, w, v, e) in part {
                c.push(patient, &w.resource_type, &w.id, v, e);
            }
            self.insert_event_rows(&c).await?;
        }
        Ok(())
    }

    async fn insert_event_rows(&mut self, c: &EventColumns<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "insert into patient_event (patient_id, resource_type, resource_id, version_id, component, kind,
                event_time, end_time, category, code_system, code, display, value_num, value_text, unit,
                ref_low, ref_high, interpretation, status)
             select * from unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::int[], $6::text[],
                $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::text[],
                $13::float8[], $14::text[], $15::text[], $16::float8[], $17::float8[], $18::text[], $19::text[])",
        )
        .bind(&c.patient)
        .bind(&c.rtype)
        .bind(&c.rid)
        .bind(&c.version)
        .bind(&c.component)
        .bind(&c.kind)
        .bind(&c.time)
        .bind(&c.end_time)
        .bind(&c.category)
        .bind(&c.code_system)
        .bind(&c.code)
        .bind(&c.display)
        .bind(&c.value_num)
        .bind(&c.value_text)
        .bind(&c.unit)
        .bind(&c.ref_low)
        .bind(&c.ref_high)
        .bind(&c.interpretation)
        .bind(&c.status)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Marks a resource deleted (a new version with no content). Returns the new version,
    /// or None when there was nothing to delete.
    pub async fn delete(&mut self, resource_type: &str, id: &str, ingest_id: Option<i64>) -> Result<Option<i64>, StoreError> {
        self.locked.remove(&(resource_type.to_owned(), id.to_owned()));
        let cur = self.lock_current(&[resource_type], &[id]).await?;
        let Some(c) = cur.get(&(resource_type.to_owned(), id.to_owned())) else { return Ok(None) };
        if c.deleted {
            return Ok(Some(c.version_id));
        }
        let v = c.version_id + 1;
        sqlx::query("update resource set version_id = $3, deleted = true, last_updated = $4 where resource_type = $1 and id = $2")
            .bind(resource_type)
            .bind(id)
            .bind(v)
            .bind(self.now)
            .execute(&mut *self.tx)
            .await?;
        sqlx::query(
            "insert into resource_history (resource_type, id, version_id, last_updated, sha256, content, ingest_id)
             values ($1, $2, $3, $4, '\\x', null, $5)",
        )
        .bind(resource_type)
        .bind(id)
        .bind(v)
        .bind(self.now)
        .bind(ingest_id)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query("delete from patient_event where resource_type = $1 and resource_id = $2")
            .bind(resource_type)
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        sqlx::query("delete from resource_identifier where resource_type = $1 and id = $2")
            .bind(resource_type)
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(Some(v))
    }

    /// Opens the ingest log row for this request (committed with the data).
    pub async fn log_ingest(&mut self, record: &IngestRecord) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "insert into ingest_log (sender, channel, kind, payload_bytes, payload_sha256, outcome, rejected)
             values ($1, $2, $3, $4, $5, 'stored', $6) returning id",
        )
        .bind(&record.sender)
        .bind(&record.channel)
        .bind(&record.kind)
        .bind(record.payload_bytes)
        .bind(&record.payload_sha256[..])
        .bind(record.rejected)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(row.try_get("id")?)
    }

    /// Closes the ingest log row with the counts (and issues, for partial outcomes).
    pub async fn finish_ingest(&mut self, ingest_id: i64, results: &[WriteResult], rejected: i32, issues: Option<&Value>) -> Result<(), StoreError> {
        let count = |o: WriteOutcome| results.iter().filter(|r| r.outcome == o).count() as i32;
        sqlx::query(
            "update ingest_log set created = $2, updated = $3, unchanged = $4, rejected = $5, issues = $6,
                outcome = case when $5 = 0 then 'stored' when $2 + $3 + $4 = 0 then 'rejected' else 'partial' end
             where id = $1",
        )
        .bind(ingest_id)
        .bind(count(WriteOutcome::Created))
        .bind(count(WriteOutcome::Updated))
        .bind(count(WriteOutcome::Unchanged))
        .bind(rejected)
        .bind(issues.map(sqlx::types::Json))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Enqueues (or pushes back, debouncing) a summary job for each patient whose data
    /// changed, in this transaction: the job exists exactly when the data does.
    pub async fn enqueue_summaries(&mut self, patients: &[&str]) -> Result<(), StoreError> {
        if patients.is_empty() || !self.enqueue_jobs {
            return Ok(());
        }
        let not_before = self.now + self.debounce;
        sqlx::query(
            "insert into summary_job (patient_id, not_before) select p, $2 from unnest($1::text[]) as p order by p
             on conflict (patient_id) do update
             set generation = summary_job.generation + 1, enqueued_at = now(), not_before = excluded.not_before",
        )
        .bind(patients)
        .bind(not_before)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Marks a point to roll back to (a batch entry that fails undoes only itself).
    pub async fn savepoint(&mut self) -> Result<(), StoreError> {
        sqlx::query("savepoint chartline_entry").execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Undoes everything since [`StoreTx::savepoint`]; the transaction stays usable.
    pub async fn rollback_to_savepoint(&mut self) -> Result<(), StoreError> {
        // Locks and rows taken since the savepoint are gone with it.
        self.locked.clear();
        sqlx::query("rollback to savepoint chartline_entry").execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Keeps everything since [`StoreTx::savepoint`].
    pub async fn release_savepoint(&mut self) -> Result<(), StoreError> {
        sqlx::query("release savepoint chartline_entry").execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Commits everything written through this transaction.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

#[derive(Default)]
struct EventColumns<'a> {
    patient: Vec<&'a str>,
    rtype: Vec<&'a str>,
    rid: Vec<&'a str>,
    version: Vec<i64>,
    component: Vec<i32>,
    kind: Vec<&'a str>,
    time: Vec<Option<DateTime<Utc>>>,
    end_time: Vec<Option<DateTime<Utc>>>,
    category: Vec<Option<&'a str>>,
    code_system: Vec<Option<&'a str>>,
    code: Vec<Option<&'a str>>,
    display: Vec<Option<&'a str>>,
    value_num: Vec<Option<f64>>,
    value_text: Vec<Option<&'a str>>,
    unit: Vec<Option<&'a str>>,
    ref_low: Vec<Option<f64>>,
    ref_high: Vec<Option<f64>>,
    interpretation: Vec<Option<&'a str>>,
    status: Vec<Option<&'a str>>,
}

impl<'a> EventColumns<'a> {
    fn push(&mut self, patient: &'a str, rtype: &'a str, rid: &'a str, version: i64, e: &'a PatientEvent) {
        self.patient.push(patient);
        self.rtype.push(rtype);
        self.rid.push(rid);
        self.version.push(version);
        self.component.push(e.component);
        self.kind.push(e.kind);
        self.time.push(e.time);
        self.end_time.push(e.end_time);
        self.category.push(e.category.as_deref());
        self.code_system.push(e.code_system.as_deref());
        self.code.push(e.code.as_deref());
        self.display.push(e.display.as_deref());
        self.value_num.push(e.value_num);
        self.value_text.push(e.value_text.as_deref());
        self.unit.push(e.unit.as_deref());
        self.ref_low.push(e.ref_low);
        self.ref_high.push(e.ref_high);
        self.interpretation.push(e.interpretation.as_deref());
        self.status.push(e.status.as_deref());
    }
}
