//! Timeline reads: the `patient_event` index, one indexed SELECT per patient.

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::{Store, StoreError};

/// One `patient_event` row with the version of the resource it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// Source resource type.
    pub resource_type: String,
    /// Source resource id.
    pub resource_id: String,
    /// Source resource version.
    pub version_id: i64,
    /// 0 for the resource itself, 1.. for Observation components.
    pub component: i32,
    /// Event kind (`condition`, `observation`, …).
    pub kind: String,
    /// When.
    pub time: Option<DateTime<Utc>>,
    /// Until when.
    pub end_time: Option<DateTime<Utc>>,
    /// Category code.
    pub category: Option<String>,
    /// Code system.
    pub code_system: Option<String>,
    /// Code.
    pub code: Option<String>,
    /// Display text.
    pub display: Option<String>,
    /// Numeric value.
    pub value_num: Option<f64>,
    /// Text value.
    pub value_text: Option<String>,
    /// Unit.
    pub unit: Option<String>,
    /// Reference range low.
    pub ref_low: Option<f64>,
    /// Reference range high.
    pub ref_high: Option<f64>,
    /// Interpretation code.
    pub interpretation: Option<String>,
    /// Status.
    pub status: Option<String>,
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Inclusive lower bound on the event time (events without a time are kept).
    pub from: Option<DateTime<Utc>>,
    /// Inclusive upper bound on the event time (events without a time are kept).
    pub to: Option<DateTime<Utc>>,
    /// Only these kinds (all when empty).
    pub kinds: Vec<String>,
}

impl Store {
    /// The patient's events in a total, insertion-independent order: time (undated last),
    /// then resource type, id and component.
    pub async fn patient_events(&self, patient_id: &str, filter: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        let kinds: Option<&[String]> = (!filter.kinds.is_empty()).then_some(filter.kinds.as_slice());
        let rows = sqlx::query(
            "select resource_type, resource_id, version_id, component, kind, event_time, end_time, category,
                    code_system, code, display, value_num, value_text, unit, ref_low, ref_high, interpretation, status
             from patient_event
             where patient_id = $1
               and ($2::timestamptz is null or event_time is null or event_time >= $2)
               and ($3::timestamptz is null or event_time is null or event_time <= $3)
               and ($4::text[] is null or kind = any($4))
             order by event_time nulls last, resource_type, resource_id, component",
        )
        .bind(patient_id)
        .bind(filter.from)
        .bind(filter.to)
        .bind(kinds)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_row).collect()
    }
}

fn event_row(r: &sqlx::postgres::PgRow) -> Result<EventRow, StoreError> {
    Ok(EventRow {
                    resource_type: r.try_get("resource_type")?,
                    resource_id: r.try_get("resource_id")?,
                    version_id: r.try_get("version_id")?,
                    component: r.try_get("component")?,
                    kind: r.try_get("kind")?,
                    time: r.try_get("event_time")?,
                    end_time: r.try_get("end_time")?,
                    category: r.try_get("category")?,
                    code_system: r.try_get("code_system")?,
                    code: r.try_get("code")?,
                    display: r.try_get("display")?,
                    value_num: r.try_get("value_num")?,
                    value_text: r.try_get("value_text")?,
                    unit: r.try_get("unit")?,
                    ref_low: r.try_get("ref_low")?,
                    ref_high: r.try_get("ref_high")?,
                    interpretation: r.try_get("interpretation")?,
                    status: r.try_get("status")?,
    })
}

impl Store {
    /// The `n` newest DocumentReferences of the patient at or before `to`, with their content
    /// and the event row that indexes them (one query, for note excerpts).
    pub async fn newest_documents(
        &self,
        patient_id: &str,
        to: DateTime<Utc>,
        n: i64,
    ) -> Result<Vec<(EventRow, serde_json::Value)>, StoreError> {
        let rows = sqlx::query(
            "select e.resource_type, e.resource_id, e.version_id, e.component, e.kind, e.event_time, e.end_time, e.category,
                    e.code_system, e.code, e.display, e.value_num, e.value_text, e.unit, e.ref_low, e.ref_high,
                    e.interpretation, e.status, h.content
             from patient_event e
             join resource_history h on h.resource_type = e.resource_type and h.id = e.resource_id and h.version_id = e.version_id
             where e.patient_id = $1 and e.kind = 'document' and e.event_time is not null and e.event_time <= $2
             order by e.event_time desc, e.resource_id limit $3",
        )
        .bind(patient_id)
        .bind(to)
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((event_row(r)?, crate::read::content(r)?.unwrap_or(serde_json::Value::Null)))
            })
            .collect()
    }

    /// The current versions of the patient's resources indexed under `kinds` (their
    /// component-0 rows), dated at or before `to` or undated, whose content matches the
    /// SQL/JSON path predicate `content_filter` (a `jsonb_path_exists` path), with the event
    /// row that indexes each; newest first (undated last), then by type and id. One query.
    pub async fn patient_resources_matching(
        &self,
        patient_id: &str,
        kinds: &[&str],
        to: DateTime<Utc>,
        content_filter: &str,
    ) -> Result<Vec<(EventRow, serde_json::Value)>, StoreError> {
        let rows = sqlx::query(
            "select e.resource_type, e.resource_id, e.version_id, e.component, e.kind, e.event_time, e.end_time, e.category,
                    e.code_system, e.code, e.display, e.value_num, e.value_text, e.unit, e.ref_low, e.ref_high,
                    e.interpretation, e.status, h.content
             from patient_event e
             join resource_history h on h.resource_type = e.resource_type and h.id = e.resource_id and h.version_id = e.version_id
             where e.patient_id = $1 and e.kind = any($2) and e.component = 0
               and (e.event_time is null or e.event_time <= $3)
               and jsonb_path_exists(h.content::jsonb, $4::jsonpath)
             order by e.event_time desc nulls last, e.resource_type, e.resource_id",
        )
        .bind(patient_id)
        .bind(kinds)
        .bind(to)
        .bind(content_filter)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((event_row(r)?, crate::read::content(r)?.unwrap_or(serde_json::Value::Null)))
            })
            .collect()
    }

    /// The benchmark floor for timelines: the same indexed SELECT, rows counted, not decoded.
    pub async fn patient_events_floor(&self, patient_id: &str) -> Result<usize, StoreError> {
        let rows = sqlx::query("select * from patient_event where patient_id = $1 order by event_time nulls last, resource_type, resource_id, component")
            .bind(patient_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.len())
    }
}
