//! From timeline rows to candidate prompt lines: IPS-shaped sections, each line with its
//! source tags and a priority (see `prompt.rs` for how priorities cut to a budget).

use std::collections::BTreeMap;

use base64::Engine;
use chartline_store::EventRow;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde_json::Value;

use crate::TimelineError;
use crate::images::{ChartImage, Location, Resolved};
use crate::prompt::Citation;

/// What the prompt is for. Each task brings its instructions; the set is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// A concise, cited summary of the chart for the treating clinician.
    ChartSummary,
}

impl Task {
    /// Every supported task name.
    pub const ALL: &'static [&'static str] = &["chart_summary"];

    /// Parses a task name.
    pub fn parse(name: &str) -> Result<Task, TimelineError> {
        match name {
            "chart_summary" => Ok(Task::ChartSummary),
            _ => Err(TimelineError::InvalidArgument(format!("task must be one of: {}", Task::ALL.join(", ")))),
        }
    }

    /// The task's name.
    pub fn name(self) -> &'static str {
        match self {
            Task::ChartSummary => "chart_summary",
        }
    }

    /// Instructions placed before the chart.
    pub fn instructions(self) -> &'static str {
        match self {
            Task::ChartSummary => {
                "Task: write a concise clinical summary of this patient's chart for the treating clinician: \
active problems, current medications, allergies, notable results and their trends, and recent care. \
Use only the facts in the chart below. After each statement, cite the source tags it rests on exactly as \
they appear, for example [Condition/123]. Do not state anything the chart does not support."
            }
        }
    }
}

/// One prompt section: a stable key, a title and, where IPS defines one, its LOINC code.
pub(crate) struct SectionSpec {
    pub key: &'static str,
    pub title: &'static str,
    pub loinc: &'static str,
}

/// The sections in the order they are rendered.
pub(crate) const SECTIONS: &[SectionSpec] = &[
    SectionSpec { key: "allergies", title: "Allergies and intolerances", loinc: "48765-2" },
    SectionSpec { key: "problems", title: "Active problems", loinc: "11450-4" },
    SectionSpec { key: "medications", title: "Active medications", loinc: "10160-0" },
    SectionSpec { key: "results", title: "Laboratory results", loinc: "30954-2" },
    SectionSpec { key: "vital_signs", title: "Vital signs", loinc: "8716-3" },
    SectionSpec { key: "notes", title: "Recent clinical notes", loinc: "" },
    SectionSpec { key: "images", title: "Imaging", loinc: "18748-4" },
    SectionSpec { key: "care_plans", title: "Active care plans", loinc: "18776-5" },
    SectionSpec { key: "procedures", title: "Procedures", loinc: "47519-4" },
    SectionSpec { key: "immunizations", title: "Immunizations", loinc: "11369-6" },
    SectionSpec { key: "encounters", title: "Encounters", loinc: "46240-8" },
    SectionSpec { key: "past_problems", title: "Resolved problems", loinc: "11348-0" },
    SectionSpec { key: "past_medications", title: "Stopped medications", loinc: "" },
];

fn section(key: &str) -> usize {
    SECTIONS.iter().position(|s| s.key == key).unwrap_or(0)
}

/// A candidate line.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    pub section: usize,
    /// Higher stays longer when the budget is short.
    pub priority: f64,
    /// Position within its section when rendered.
    pub order: usize,
    pub text: String,
    pub cites: Vec<Citation>,
    /// An image to attach after this line (an index into [`Input::images`]), when chosen.
    pub image: Option<usize>,
}

/// A decoded note.
pub(crate) struct Note {
    pub event: EventRow,
    pub text: String,
}

/// What a prompt is built from.
pub(crate) struct Input<'a> {
    pub patient: &'a Value,
    pub patient_version: i64,
    pub events: &'a [EventRow],
    pub notes: Vec<Note>,
    /// The chart's image attachments, newest first; `resolved` for those chosen to attach.
    pub images: Vec<InputImage>,
    pub as_of: DateTime<Utc>,
}

/// An image attachment of the chart and, when chosen for the prompt, its bytes' digest.
pub(crate) struct InputImage {
    pub image: ChartImage,
    pub resolved: Option<Resolved>,
}

/// Longest note excerpt, in characters.
const NOTE_CHARS: usize = 600;

/// The text of a DocumentReference's first text attachment, whitespace folded.
pub(crate) fn note_text(doc: &Value) -> Option<String> {
    for c in doc.get("content")?.as_array()? {
        let a = c.get("attachment")?;
        let ct = a.get("contentType").and_then(Value::as_str).unwrap_or("text/plain");
        if !ct.starts_with("text/") {
            continue;
        }
        let data = a.get("data")?.as_str()?;
        let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD.decode(compact).ok()?;
        let text = String::from_utf8_lossy(&bytes);
        let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if !folded.is_empty() {
            return Some(folded);
        }
    }
    None
}

pub(crate) fn date(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d").to_string()).unwrap_or_else(|| "undated".into())
}

pub(crate) fn num(v: f64) -> String {
    let s = format!("{:.2}", v);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_owned() }
}

fn cite(e: &EventRow) -> Citation {
    Citation { resource_type: e.resource_type.clone(), id: e.resource_id.clone(), version_id: e.version_id }
}

fn tags(cites: &[Citation]) -> String {
    cites.iter().map(|c| format!("[{}/{}]", c.resource_type, c.id)).collect()
}

fn label(e: &EventRow) -> String {
    one_line(e.display.as_deref().or(e.code.as_deref()).unwrap_or("unnamed"))
}

/// Folds line breaks and runs of white space: every prompt line is one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn group_key(e: &EventRow) -> String {
    match (&e.code_system, &e.code) {
        (s, Some(c)) => format!("{}|{c}", s.as_deref().unwrap_or("")),
        _ => format!("|{}", label(e)),
    }
}

/// Adds a recency bonus in [0, 5) by the rank of each line's time among its section's lines.
fn with_recency(mut lines: Vec<(Line, Option<DateTime<Utc>>)>) -> Vec<Line> {
    let mut times: Vec<Option<DateTime<Utc>>> = lines.iter().map(|(_, t)| *t).collect();
    times.sort();
    let n = times.len().max(1) as f64;
    for (l, t) in &mut lines {
        let rank = times.partition_point(|x| x < t) as f64;
        l.priority += 5.0 * rank / n;
    }
    lines.into_iter().map(|(l, _)| l).collect()
}

/// The fixed lines (instructions and the patient header) and the candidate lines.
pub(crate) fn lines(input: &Input<'_>, task: Task) -> (Vec<String>, Vec<Line>) {
    let fixed = vec![
        task.instructions().to_owned(),
        String::new(),
        format!("Chart as of {}:", input.as_of.format("%Y-%m-%d")),
        patient_header(input),
    ];
    let ev: Vec<&EventRow> = input.events.iter().filter(|e| e.time.is_none_or(|t| t <= input.as_of)).collect();
    let mut out = Vec::new();
    out.extend(allergies(&ev));
    out.extend(problems(&ev, input.as_of));
    out.extend(medications(&ev));
    out.extend(observations(&ev, "laboratory", "results", 75.0, 45.0));
    out.extend(observations(&ev, "vital-signs", "vital_signs", 70.0, 50.0));
    out.extend(notes(&input.notes));
    out.extend(images(&ev, &input.images));
    out.extend(care_plans(&ev));
    out.extend(grouped(&ev, "procedure", "procedures", 35.0, "procedure", "procedures"));
    out.extend(grouped(&ev, "immunization", "immunizations", 30.0, "dose", "doses"));
    out.extend(encounters(&ev));
    (fixed, out)
}

fn patient_header(input: &Input<'_>) -> String {
    let p = input.patient;
    let id = p.get("id").and_then(Value::as_str).unwrap_or("");
    let gender = p.get("gender").and_then(Value::as_str).unwrap_or("unknown gender");
    let birth = p.get("birthDate").and_then(Value::as_str).and_then(|b| NaiveDate::parse_from_str(b.get(..10).unwrap_or(b), "%Y-%m-%d").ok());
    let deceased = p
        .get("deceasedDateTime")
        .and_then(Value::as_str)
        .and_then(|d| DateTime::parse_from_rfc3339(d).ok().map(|t| t.with_timezone(&Utc)))
        .filter(|t| *t <= input.as_of);
    let deceased_flag = p.get("deceasedBoolean").and_then(Value::as_bool).unwrap_or(false);
    let age_at = |when: NaiveDate, b: NaiveDate| {
        let mut years = when.year() - b.year();
        if (when.month(), when.day()) < (b.month(), b.day()) {
            years -= 1;
        }
        years
    };
    let mut s = format!("Patient [Patient/{id}]: {gender}");
    if let Some(b) = birth {
        match deceased {
            Some(d) => s.push_str(&format!(", born {b}, deceased {} at age {}", d.format("%Y-%m-%d"), age_at(d.date_naive(), b))),
            None => s.push_str(&format!(", {} years old (born {b})", age_at(input.as_of.date_naive(), b))),
        }
    }
    if deceased.is_none() && deceased_flag {
        s.push_str(", deceased");
    }
    s.push('.');
    s
}

fn allergies(ev: &[&EventRow]) -> Vec<Line> {
    let s = section("allergies");
    let mut v: Vec<&&EventRow> = ev.iter().filter(|e| e.kind == "allergy" && e.status.as_deref().is_none_or(|st| st == "active")).collect();
    v.sort_by(|a, b| label(a).cmp(&label(b)).then(a.resource_id.cmp(&b.resource_id)));
    v.into_iter()
        .enumerate()
        .map(|(i, e)| {
            let mut t = format!("- {}", label(e));
            if let Some(c) = &e.category {
                t.push_str(&format!(" ({c})"));
            }
            if let Some(c) = &e.value_text {
                t.push_str(&format!(", criticality {}", one_line(c)));
            }
            if let Some(r) = &e.interpretation {
                t.push_str(&format!(", reaction: {}", one_line(r)));
            }
            t.push_str(&format!(", recorded {} ", date(e.time)));
            let cites = vec![cite(e)];
            t.push_str(&tags(&cites));
            Line { section: s, priority: 95.0, order: i, text: t, cites, image: None }
        })
        .collect()
}

fn is_active_condition(e: &EventRow, as_of: DateTime<Utc>) -> bool {
    matches!(e.status.as_deref(), Some("active" | "recurrence" | "relapse"))
        && !matches!(e.value_text.as_deref(), Some("entered-in-error" | "refuted"))
        && e.end_time.is_none_or(|t| t > as_of)
}

fn problems(ev: &[&EventRow], as_of: DateTime<Utc>) -> Vec<Line> {
    let conditions: Vec<&&EventRow> =
        ev.iter().filter(|e| e.kind == "condition" && !matches!(e.value_text.as_deref(), Some("entered-in-error" | "refuted"))).collect();
    let mut active: BTreeMap<String, Vec<&EventRow>> = BTreeMap::new();
    let mut past: BTreeMap<String, Vec<&EventRow>> = BTreeMap::new();
    for e in conditions {
        let target = if is_active_condition(e, as_of) { &mut active } else { &mut past };
        target.entry(group_key(e)).or_default().push(e);
    }
    let mut out = Vec::new();
    let mut act: Vec<(Line, Option<DateTime<Utc>>)> = active
        .values()
        .map(|g| {
            let first = g.iter().filter_map(|e| e.time).min();
            let cites: Vec<Citation> = g.iter().map(|e| cite(e)).collect();
            let text = format!("- {} (since {}) {}", label(g[g.len() - 1]), date(first), tags(&cites));
            (Line { section: section("problems"), priority: 90.0, order: 0, text, cites, image: None }, first)
        })
        .collect();
    act.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.text.cmp(&b.0.text)));
    for (i, l) in act.iter_mut().enumerate() {
        l.0.order = i;
    }
    out.extend(with_recency(act));
    let mut res: Vec<(Line, Option<DateTime<Utc>>)> = past
        .values()
        .map(|g| {
            let last = g.iter().max_by_key(|e| (e.time, &e.resource_id)).copied().unwrap_or(g[0]);
            let n = g.len();
            let text = if n == 1 {
                format!("- {} ({}, resolved {}) [{}/{}]", label(last), date(last.time), date(last.end_time), last.resource_type, last.resource_id)
            } else {
                format!("- {} ({n} episodes, last {}) [{}/{}]", label(last), date(last.time), last.resource_type, last.resource_id)
            };
            (Line { section: section("past_problems"), priority: 20.0, order: 0, text, cites: vec![cite(last)], image: None }, last.time)
        })
        .collect();
    res.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.text.cmp(&b.0.text)));
    for (i, l) in res.iter_mut().enumerate() {
        l.0.order = i;
    }
    out.extend(with_recency(res));
    out
}

fn medications(ev: &[&EventRow]) -> Vec<Line> {
    let meds: Vec<&&EventRow> = ev
        .iter()
        .filter(|e| e.kind == "medication" && matches!(e.category.as_deref(), Some("MedicationRequest" | "MedicationStatement")))
        .filter(|e| !matches!(e.status.as_deref(), Some("entered-in-error" | "draft")))
        .collect();
    let mut active: BTreeMap<String, Vec<&EventRow>> = BTreeMap::new();
    let mut past: BTreeMap<String, Vec<&EventRow>> = BTreeMap::new();
    for e in meds {
        let target = if matches!(e.status.as_deref(), Some("active" | "on-hold" | "intended")) { &mut active } else { &mut past };
        target.entry(group_key(e)).or_default().push(e);
    }
    let mut out = Vec::new();
    let mut act: Vec<(Line, Option<DateTime<Utc>>)> = active
        .values()
        .map(|g| {
            let latest = g.iter().max_by_key(|e| (e.time, &e.resource_id)).copied().unwrap_or(g[0]);
            let since = g.iter().filter_map(|e| e.time).min();
            let cites: Vec<Citation> = g.iter().map(|e| cite(e)).collect();
            let dose = latest.value_text.as_deref().map(|d| format!(": {}", one_line(d))).unwrap_or_default();
            let on_hold = if latest.status.as_deref() == Some("on-hold") { " (on hold)" } else { "" };
            let text = format!("- {}{dose}{on_hold} (since {}) {}", label(latest), date(since), tags(&cites));
            (Line { section: section("medications"), priority: 85.0, order: 0, text, cites, image: None }, latest.time)
        })
        .collect();
    act.sort_by(|a, b| a.0.text.cmp(&b.0.text));
    for (i, l) in act.iter_mut().enumerate() {
        l.0.order = i;
    }
    out.extend(with_recency(act));
    let mut stopped: Vec<(Line, Option<DateTime<Utc>>)> = past
        .values()
        .map(|g| {
            let latest = g.iter().max_by_key(|e| (e.time, &e.resource_id)).copied().unwrap_or(g[0]);
            let n = g.len();
            let orders = if n == 1 { "1 order".to_owned() } else { format!("{n} orders") };
            let text = format!(
                "- {} ({}, {orders}, last {}) [{}/{}]",
                label(latest),
                latest.status.as_deref().unwrap_or("not active"),
                date(latest.time),
                latest.resource_type,
                latest.resource_id
            );
            (Line { section: section("past_medications"), priority: 15.0, order: 0, text, cites: vec![cite(latest)], image: None }, latest.time)
        })
        .collect();
    stopped.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.text.cmp(&b.0.text)));
    for (i, l) in stopped.iter_mut().enumerate() {
        l.0.order = i;
    }
    out.extend(with_recency(stopped));
    out
}

const ABNORMAL: &[&str] = &["H", "HH", "HU", "L", "LL", "LU", "A", "AA", "POS", "DET", "R", "W"];

fn flag(e: &EventRow) -> Option<&'static str> {
    if let Some(i) = e.interpretation.as_deref()
        && ABNORMAL.contains(&i)
    {
        return Some(if i.starts_with('H') { "high" } else if i.starts_with('L') { "low" } else { "abnormal" });
    }
    let v = e.value_num?;
    if e.ref_high.is_some_and(|h| v > h) {
        return Some("high");
    }
    if e.ref_low.is_some_and(|l| v < l) {
        return Some("low");
    }
    None
}

/// Direction of a series: first vs last, ±5 % of the first value.
pub(crate) fn direction(first: f64, last: f64) -> &'static str {
    let base = first.abs().max(f64::EPSILON);
    let change = (last - first) / base;
    if change > 0.05 {
        "rising"
    } else if change < -0.05 {
        "falling"
    } else {
        "stable"
    }
}

fn observations(ev: &[&EventRow], category: &str, key: &str, changing: f64, stable: f64) -> Vec<Line> {
    let mut groups: BTreeMap<String, Vec<&EventRow>> = BTreeMap::new();
    for e in ev.iter().filter(|e| {
        e.kind == "observation"
            && e.category.as_deref() == Some(category)
            && (e.value_num.is_some() || e.value_text.is_some())
            && !matches!(e.status.as_deref(), Some("entered-in-error" | "cancelled"))
    }) {
        groups.entry(group_key(e)).or_default().push(e);
    }
    let mut lines: Vec<(Line, Option<DateTime<Utc>>)> = groups
        .values()
        .map(|g| {
            // Rows come time-ordered from the store; keep that order explicit here.
            let mut g = g.clone();
            g.sort_by(|a, b| (a.time, &a.resource_id, a.component).cmp(&(b.time, &b.resource_id, b.component)));
            let last = g[g.len() - 1];
            let unit = last.unit.as_deref().map(|u| format!(" {u}")).unwrap_or_default();
            let value = match (last.value_num, &last.value_text) {
                (Some(v), Some(cmp)) if matches!(cmp.as_str(), "<" | "<=" | ">" | ">=") => format!("{cmp}{}{unit}", num(v)),
                (Some(v), _) => format!("{}{unit}", num(v)),
                (None, Some(t)) => one_line(t),
                (None, None) => String::new(),
            };
            let fl = flag(last);
            let mut text = format!("- {}: {value}", label(last));
            if let Some(f) = fl {
                text.push_str(&format!(" ({f})"));
            }
            text.push_str(&format!(" on {}", date(last.time)));
            let nums: Vec<f64> = g.iter().filter_map(|e| e.value_num).collect();
            let mut cites = vec![cite(last)];
            let mut moving = false;
            if nums.len() >= 2 {
                let first = g.iter().find(|e| e.value_num.is_some()).copied().unwrap_or(last);
                let (f, l) = (nums[0], nums[nums.len() - 1]);
                let min = nums.iter().copied().fold(f64::INFINITY, f64::min);
                let max = nums.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let dir = direction(f, l);
                moving = dir != "stable";
                text.push_str(&format!(
                    "; trend over {} results since {}: first {}, last {}, min {}, max {}, {dir}",
                    nums.len(),
                    date(first.time),
                    num(f),
                    num(l),
                    num(min),
                    num(max)
                ));
                if first.resource_id != last.resource_id {
                    cites.insert(0, cite(first));
                }
            }
            text.push(' ');
            text.push_str(&tags(&cites));
            let priority = if fl.is_some() || moving { changing } else { stable };
            (Line { section: section(key), priority, order: 0, text, cites, image: None }, last.time)
        })
        .collect();
    lines.sort_by(|a, b| a.0.text.cmp(&b.0.text));
    for (i, l) in lines.iter_mut().enumerate() {
        l.0.order = i;
    }
    with_recency(lines)
}

fn notes(notes: &[Note]) -> Vec<Line> {
    notes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut excerpt: String = n.text.chars().take(NOTE_CHARS).collect();
            if n.text.chars().count() > NOTE_CHARS {
                excerpt.push('…');
            }
            let cites = vec![cite(&n.event)];
            let text = format!("- {} {}: {excerpt} {}", date(n.event.time), label(&n.event), tags(&cites));
            Line { section: section("notes"), priority: 60.0 - 2.0 * i as f64, order: i, text, cites, image: None }
        })
        .collect()
}

/// The Imaging section: one line per image attachment (DocumentReference, Media,
/// DiagnosticReport), plus ImagingStudy and the Media without an image attachment as facts;
/// newest first. A line whose image is chosen to attach carries `image`.
fn images(ev: &[&EventRow], images: &[InputImage]) -> Vec<Line> {
    let s = section("images");
    let covered: std::collections::HashSet<(&str, &str)> =
        images.iter().map(|i| (i.image.source.resource_type.as_str(), i.image.source.id.as_str())).collect();
    // (time, type, id, attachment index, text, cites, image)
    type Item = (Option<DateTime<Utc>>, String, String, usize, String, Vec<Citation>, Option<usize>);
    let mut items: Vec<Item> = Vec::new();
    for e in ev.iter().filter(|e| {
        matches!(e.kind.as_str(), "imaging-study" | "media")
            && e.component == 0
            && e.status.as_deref() != Some("entered-in-error")
            && !covered.contains(&(e.resource_type.as_str(), e.resource_id.as_str()))
    }) {
        let mut text = format!("- {} {}", date(e.time), label(e));
        if let Some(n) = e.value_num {
            text.push_str(&format!(" ({} instances)", num(n)));
        }
        let cites = vec![cite(e)];
        text.push(' ');
        text.push_str(&tags(&cites));
        items.push((e.time, e.resource_type.clone(), e.resource_id.clone(), 0, text, cites, None));
    }
    for (k, i) in images.iter().enumerate() {
        let img = &i.image;
        let availability = match img.location {
            Location::Inline | Location::Binary { .. } => "",
            Location::Remote => "; external, not retrievable",
            Location::Absent => "; no data",
        };
        let cites = vec![img.source.clone()];
        let text = format!("- {} {} ({}{availability}) {}", date(img.time), img.title, img.content_type, tags(&cites));
        let image = i.resolved.as_ref().map(|_| k);
        items.push((img.time, img.source.resource_type.clone(), img.source.id.clone(), img.attachment_index, text, cites, image));
    }
    items.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)).then_with(|| a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    let lines: Vec<(Line, Option<DateTime<Utc>>)> = items
        .into_iter()
        .enumerate()
        .map(|(order, (time, _, _, _, text, cites, image))| (Line { section: s, priority: 55.0, order, text, cites, image }, time))
        .collect();
    with_recency(lines)
}

fn care_plans(ev: &[&EventRow]) -> Vec<Line> {
    let mut v: Vec<&&EventRow> = ev.iter().filter(|e| e.kind == "care-plan" && e.status.as_deref() == Some("active")).collect();
    v.sort_by(|a, b| a.time.cmp(&b.time).then(a.resource_id.cmp(&b.resource_id)));
    let lines: Vec<(Line, Option<DateTime<Utc>>)> = v
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let cites = vec![cite(e)];
            let text = format!("- {} (since {}) {}", label(e), date(e.time), tags(&cites));
            (Line { section: section("care_plans"), priority: 40.0, order: i, text, cites, image: None }, e.time)
        })
        .collect();
    with_recency(lines)
}

fn grouped(ev: &[&EventRow], kind: &str, key: &str, base: f64, one: &str, many: &str) -> Vec<Line> {
    let mut groups: BTreeMap<String, Vec<&EventRow>> = BTreeMap::new();
    for e in ev.iter().filter(|e| e.kind == kind && !matches!(e.status.as_deref(), Some("entered-in-error" | "not-done"))) {
        groups.entry(group_key(e)).or_default().push(e);
    }
    let mut lines: Vec<(Line, Option<DateTime<Utc>>)> = groups
        .values()
        .map(|g| {
            let last = g.iter().max_by_key(|e| (e.time, &e.resource_id)).copied().unwrap_or(g[0]);
            let n = g.len();
            let count = if n == 1 { format!("1 {one}") } else { format!("{n} {many}") };
            let cites = vec![cite(last)];
            let text = format!("- {} ({count}, last {}) {}", label(last), date(last.time), tags(&cites));
            (Line { section: section(key), priority: base, order: 0, text, cites, image: None }, last.time)
        })
        .collect();
    lines.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.text.cmp(&b.0.text)));
    for (i, l) in lines.iter_mut().enumerate() {
        l.0.order = i;
    }
    with_recency(lines)
}

fn encounters(ev: &[&EventRow]) -> Vec<Line> {
    let mut groups: BTreeMap<String, Vec<&EventRow>> = BTreeMap::new();
    for e in ev.iter().filter(|e| e.kind == "encounter" && !matches!(e.status.as_deref(), Some("entered-in-error" | "cancelled"))) {
        groups.entry(label(e)).or_default().push(e);
    }
    let mut lines: Vec<(Line, Option<DateTime<Utc>>)> = groups
        .values()
        .map(|g| {
            let last = g.iter().max_by_key(|e| (e.time, &e.resource_id)).copied().unwrap_or(g[0]);
            let first = g.iter().filter_map(|e| e.time).min();
            let class = last.category.as_deref().map(|c| format!(", {c}")).unwrap_or_default();
            let cites = vec![cite(last)];
            let text = if g.len() == 1 {
                format!("- {}{class} on {} {}", label(last), date(last.time), tags(&cites))
            } else {
                format!("- {}{class}: {} encounters {} to {} {}", label(last), g.len(), date(first), date(last.time), tags(&cites))
            };
            (Line { section: section("encounters"), priority: 25.0, order: 0, text, cites, image: None }, last.time)
        })
        .collect();
    lines.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.text.cmp(&b.0.text)));
    for (i, l) in lines.iter_mut().enumerate() {
        l.0.order = i;
    }
    with_recency(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_without_noise() {
        assert_eq!(num(7.90), "7.9");
        assert_eq!(num(140.0), "140");
        assert_eq!(num(0.333333), "0.33");
    }

    #[test]
    fn direction_needs_five_percent() {
        assert_eq!(direction(6.0, 6.2), "stable");
        assert_eq!(direction(6.0, 7.9), "rising");
        assert_eq!(direction(90.0, 45.0), "falling");
    }

    #[test]
    fn notes_decode_from_base64_attachments() {
        let doc = serde_json::json!({"content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "data": "SGVsbG8KICB3b3JsZA=="}}]});
        assert_eq!(note_text(&doc).as_deref(), Some("Hello world"));
    }
}
