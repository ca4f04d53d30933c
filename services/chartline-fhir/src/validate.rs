//! Chartline's own structural checks: the rules the typed models do not enforce (ids,
//! empty values, string sizes, attachments, narrative safety, Bundle consistency), then
//! the typed round trip for unknown elements and wrong types.

use std::collections::HashSet;
use std::fmt::Write as _;

use base64::Engine;

use crate::error::{FhirError, Issue, IssueCode};
use crate::json::Limits;
use crate::tree::{Json as Value, Object};
use crate::typed::{TypedCheck, typed_check};

/// FHIR `id`: 1–64 of `[A-Za-z0-9\-\.]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Validates one resource (a Bundle's entries included). Returns its resource type.
pub fn validate_resource<'a>(v: &'a Value, limits: &Limits) -> Result<&'a str, FhirError> {
    let obj = v
        .as_object()
        .ok_or_else(|| FhirError::new(IssueCode::Structure, "a FHIR resource must be a JSON object"))?;
    let ty = resource_type_of(obj)?;
    let mut issues = Vec::new();
    check_resource_shell(obj, ty, &mut issues);
    walk(v, ty, &mut Path::new(ty), limits, &mut issues);
    if ty == "Bundle" {
        check_bundle(obj, limits, &mut issues);
    }
    if ty == "Questionnaire" {
        if let Some(items) = obj.get("item") {
            check_que_12(items, "Questionnaire.item", &mut issues);
        }
    }
    if let Some(contained) = obj.get("contained").and_then(Value::as_array) {
        for (i, c) in contained.iter().enumerate() {
            let prefix = format!("{ty}.contained[{i}]");
            match c.as_object() {
                Some(co) => match resource_type_of(co) {
                    Ok(cty) => {
                        if co.get("id").and_then(Value::as_str).is_none() {
                            issues.push(Issue::error(IssueCode::Required, "a contained resource must have an id").at(&prefix));
                        }
                        if co.contains_key("contained") {
                            issues.push(Issue::error(IssueCode::Invariant, "dom-2: a contained resource must not contain resources").at(&prefix));
                        }
                        check_resource_shell(co, cty, &mut issues);
                    }
                    Err(e) => issues.extend(e.within(&prefix).issues),
                },
                None => issues.push(Issue::error(IssueCode::Structure, "a contained resource must be a JSON object").at(&prefix)),
            }
        }
    }
    if issues.is_empty() {
        // Typed check last: it is the most expensive and its messages are the least precise.
        let shell;
        let target = if ty == "Bundle" {
            shell = bundle_without_resources(v);
            &shell
        } else {
            v
        };
        if let TypedCheck::Failed(issue) = typed_check(target) {
            issues.push(issue);
        }
    }
    if issues.is_empty() { Ok(ty) } else { Err(FhirError { issues }) }
}

fn resource_type_of(obj: &Object) -> Result<&str, FhirError> {
    match obj.get("resourceType") {
        None => Err(FhirError::new(IssueCode::Required, "resourceType is missing")),
        Some(Value::String(t)) if crate::is_resource_type(t) => Ok(t),
        Some(Value::String(_)) => Err(FhirError::at(
            IssueCode::Invalid,
            "resourceType",
            "resourceType is not an R4 resource type",
        )),
        Some(_) => Err(FhirError::at(IssueCode::Structure, "resourceType", "resourceType must be a string")),
    }
}

fn check_resource_shell(obj: &Object, ty: &str, issues: &mut Vec<Issue>) {
    match obj.get("id") {
        None => {}
        Some(Value::String(id)) if is_valid_id(id) => {}
        Some(Value::String(_)) => issues.push(
            Issue::error(IssueCode::Invalid, "id must be 1-64 characters of A-Z, a-z, 0-9, '-' and '.'").at(format!("{ty}.id")),
        ),
        Some(_) => issues.push(Issue::error(IssueCode::Structure, "id must be a string").at(format!("{ty}.id"))),
    }
    if let Some(meta) = obj.get("meta").and_then(Value::as_object) {
        if let Some(v) = meta.get("versionId").and_then(Value::as_str) {
            if !is_valid_id(v) {
                issues.push(Issue::error(IssueCode::Invalid, "meta.versionId must be a valid id").at(format!("{ty}.meta.versionId")));
            }
        }
        if let Some(sec) = meta.get("security").and_then(Value::as_array) {
            for (i, s) in sec.iter().enumerate() {
                if !s.is_object() {
                    issues.push(Issue::error(IssueCode::Structure, "meta.security entries must be Coding objects").at(format!("{ty}.meta.security[{i}]")));
                }
            }
        }
    }
}

/// Where the walk is: rendered to a FHIRPath-like string only when an issue needs it.
struct Path<'a> {
    root: &'a str,
    segments: Vec<Segment<'a>>,
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> Path<'a> {
    fn new(root: &'a str) -> Self {
        Path { root, segments: Vec::with_capacity(16) }
    }

    fn render(&self) -> String {
        let mut s = String::from(self.root);
        for seg in &self.segments {
            match seg {
                Segment::Key(k) => {
                    s.push('.');
                    s.push_str(k);
                }
                Segment::Index(i) => {
                    let _ = write!(s, "[{i}]");
                }
            }
        }
        s
    }

    fn then(&self, key: &str) -> String {
        format!("{}.{key}", self.render())
    }
}

/// Generic rules for every element: no empty objects, arrays or strings (ele-1 and the
/// JSON format rules), no nulls outside primitive arrays, bounded strings, attachments
/// whose `size` matches their data, narrative without active content.
fn walk<'a>(v: &'a Value, ty: &str, path: &mut Path<'a>, limits: &Limits, issues: &mut Vec<Issue>) {
    if issues.len() >= 20 {
        return;
    }
    match v {
        Value::Object(map) => {
            if map.is_empty() {
                issues.push(Issue::error(IssueCode::Invariant, "ele-1: an element must have a value or children (empty object)").at(path.render()));
                return;
            }
            // Attachment and Period rules run after the children, only where their keys
            // were seen: no lookups in every object of the tree.
            let (mut data, mut start) = (false, false);
            for (k, child) in map {
                path.segments.push(Segment::Key(k));
                data |= k == "data";
                start |= k == "start";
                match (k, child) {
                    // Bundle entries' resources are validated as resources of their own by check_bundle.
                    ("resource" | "outcome", Value::Object(o)) if o.contains_key("resourceType") && ty == "Bundle" => {}
                    ("div", Value::String(s)) => check_xhtml(s, path, issues),
                    ("data", Value::String(_)) => {}
                    (_, Value::Null) => issues.push(Issue::error(IssueCode::Structure, "null is not allowed as a property value").at(path.render())),
                    _ => walk(child, ty, path, limits, issues),
                }
                path.segments.pop();
            }
            if data && issues.len() < 20 {
                check_attachment(map, path, issues);
            }
            if start && issues.len() < 20 {
                check_period(map, path, issues);
            }
        }
        Value::Array(items) => {
            if items.is_empty() {
                issues.push(Issue::error(IssueCode::Invalid, "arrays must not be empty").at(path.render()));
                return;
            }
            for (i, child) in items.iter().enumerate() {
                // A null inside an array is legal: it aligns a primitive array with its `_` extensions.
                if !child.is_null() {
                    path.segments.push(Segment::Index(i));
                    walk(child, ty, path, limits, issues);
                    path.segments.pop();
                }
            }
        }
        Value::String(s) => {
            if s.is_empty() {
                issues.push(Issue::error(IssueCode::Invalid, "string values must not be empty").at(path.render()));
            } else if s.len() > limits.max_string_bytes {
                issues.push(
                    Issue::error(IssueCode::Invalid, format!("string is longer than {} bytes", limits.max_string_bytes)).at(path.render()),
                );
            } else if let Some(message) = string_content_issue(s) {
                issues.push(Issue::error(IssueCode::Invalid, message).at(path.render()));
            } else if limits.reject_html_in_strings && looks_like_html(s) {
                issues.push(Issue::error(IssueCode::Invalid, "string contains embedded HTML tags, rejected by the security checks").at(path.render()));
            }
        }
        _ => {}
    }
}

/// A string that is only whitespace, or holds a control character other than CR, LF and
/// TAB (C0, DEL, C1). One pass over the bytes; this runs on every string of every resource.
fn string_content_issue(s: &str) -> Option<&'static str> {
    const BLANK: &str = "string values must have non-whitespace content";
    let b = s.as_bytes();
    // Most strings are printable ASCII: checked without branches (the compiler vectorizes
    // the fold), and then only a string of spaces is wrong.
    if b.iter().fold(true, |ok, &c| ok & (c.wrapping_sub(0x20) < 0x5f)) {
        return if b.iter().all(|&c| c == b' ') { Some(BLANK) } else { None };
    }
    let mut blank = true;
    let mut ascii = true;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\r' | b'\n' | b'\t' | b' ' => {}
            0..0x20 | 0x7f => return Some(CONTROL),
            // C1 controls, U+0080..U+009F, are 0xC2 0x80..0x9F in UTF-8.
            0xc2 if b.get(i + 1).is_some_and(|n| (0x80..0xa0).contains(n)) => return Some(CONTROL),
            0x80.. => ascii = false,
            _ => blank = false,
        }
    }
    // Non-ASCII whitespace (no-break space and the like) only matters when nothing else is there.
    if blank && (ascii || s.trim().is_empty()) { Some(BLANK) } else { None }
}

const CONTROL: &str = "strings must not contain control characters other than CR, LF and TAB";

/// An Attachment's `data` must be base64, and `size` (when given) its decoded length.
fn check_attachment(map: &Object, path: &Path<'_>, issues: &mut Vec<Issue>) {
    let Some(Value::String(data)) = map.get("data") else { return };
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let decoded = match base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
        Ok(d) => d,
        Err(_) => {
            issues.push(Issue::error(IssueCode::Invalid, "data is not valid base64").at(path.then("data")));
            return;
        }
    };
    if let Some(size) = map.get("size") {
        match size.as_u64() {
            Some(n) if n as usize == decoded.len() => {}
            Some(_) => issues.push(
                Issue::error(IssueCode::Structure, format!("size does not match the decoded data length ({} bytes)", decoded.len()))
                    .at(path.then("size")),
            ),
            None => issues.push(Issue::error(IssueCode::Structure, "size must be an unsigned integer").at(path.then("size"))),
        }
    }
}

/// Narrative must be an XHTML `div` without active content (FHIR narrative rules, txt-1/txt-2).
fn check_xhtml(div: &str, path: &Path<'_>, issues: &mut Vec<Issue>) {
    let trimmed = div.trim_start();
    if !trimmed.starts_with("<div") {
        issues.push(Issue::error(IssueCode::Invalid, "narrative must be an XHTML div element").at(path.render()));
        return;
    }
    let lower = div.to_ascii_lowercase();
    let active = ["<script", "<iframe", "<object", "<embed", "<form", "<applet", "<base", "<link", "<meta", "<style", "javascript:"];
    if active.iter().any(|t| lower.contains(t)) || has_event_attribute(&lower) {
        issues.push(Issue::error(IssueCode::Invariant, "txt-1: narrative contains active content (script, event handler or disallowed element)").at(path.render()));
    }
}

fn has_event_attribute(lower: &str) -> bool {
    // ` onclick=`, ` onload =` …: an attribute name starting with "on" inside a tag.
    let b = lower.as_bytes();
    let mut in_tag = false;
    for i in 0..b.len() {
        match b[i] {
            b'<' => in_tag = true,
            b'>' => in_tag = false,
            c if in_tag && c.is_ascii_whitespace() && lower[i + 1..].starts_with("on") => {
                let name: String = lower[i + 1..].chars().take_while(|c| c.is_ascii_alphabetic()).collect();
                let rest = lower[i + 1 + name.len()..].trim_start();
                if name.len() > 2 && rest.starts_with('=') {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// Bundle rules: each entry's resource is valid; fullUrls are absolute or URNs, agree with
/// the resource id and are unique (bdl-7, ignoring history bundles' versions).
fn check_bundle(obj: &Object, limits: &Limits, issues: &mut Vec<Issue>) {
    let bundle_type = obj.get("type").and_then(Value::as_str).unwrap_or("");
    if obj.get("type").is_none() {
        issues.push(Issue::error(IssueCode::Required, "Bundle.type is required").at("Bundle.type"));
    }
    if let Some(links) = obj.get("link").and_then(Value::as_array) {
        let mut relations = HashSet::new();
        for (i, l) in links.iter().enumerate() {
            if let Some(rel) = l.get("relation").and_then(Value::as_str) {
                if !relations.insert(rel) {
                    issues.push(Issue::error(IssueCode::Invalid, "a Bundle link relation may occur only once").at(format!("Bundle.link[{i}].relation")));
                }
            }
        }
    }
    let Some(entries) = obj.get("entry") else { return };
    let Some(entries) = entries.as_array() else {
        issues.push(Issue::error(IssueCode::Structure, "Bundle.entry must be an array").at("Bundle.entry"));
        return;
    };
    if bundle_type == "document" {
        check_document_references(entries, issues);
    }
    let mut verdicts = validate_entries(entries, limits).into_iter();
    let mut seen = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        let verdict = verdicts.next().flatten();
        let prefix = format!("Bundle.entry[{i}]");
        let Some(eo) = e.as_object() else {
            issues.push(Issue::error(IssueCode::Structure, "a Bundle entry must be a JSON object").at(&prefix));
            continue;
        };
        let full_url = eo.get("fullUrl").and_then(Value::as_str);
        if let Some(u) = full_url {
            if !(u.starts_with("urn:uuid:") || u.starts_with("urn:oid:") || u.contains("://")) {
                issues.push(Issue::error(IssueCode::Invalid, "fullUrl must be an absolute URL or a urn:uuid:/urn:oid:").at(format!("{prefix}.fullUrl")));
            }
            if let Some(uuid) = u.strip_prefix("urn:uuid:") {
                if !is_uuid(uuid) {
                    issues.push(Issue::error(IssueCode::Invalid, "urn:uuid: fullUrl must carry a UUID").at(format!("{prefix}.fullUrl")));
                }
            }
        }
        if bundle_type == "searchset" {
            let mode = e.pointer("/search/mode").and_then(Value::as_str);
            let rty = e.pointer("/resource/resourceType").and_then(Value::as_str);
            if mode == Some("outcome") && rty.is_some_and(|t| t != "OperationOutcome") {
                issues.push(Issue::error(IssueCode::Invalid, "a searchset entry in mode outcome must be an OperationOutcome").at(format!("{prefix}.resource")));
            }
            if mode == Some("match") && e.pointer("/resource/id").is_none() {
                issues.push(Issue::error(IssueCode::Invalid, "search results must have ids").at(format!("{prefix}.resource")));
            }
        }
        match eo.get("resource").zip(verdict) {
            Some((r, verdict)) => match verdict {
                Ok(rty) => {
                    let rid = r.get("id").and_then(Value::as_str);
                    if let (Some(u), Some(id)) = (full_url, rid) {
                        if u.contains("://") {
                            if let crate::Reference::Literal { resource_type, id: uid, .. } = crate::parse_reference(u) {
                                if resource_type != rty || uid != id {
                                    issues.push(Issue::error(IssueCode::Invalid, "fullUrl does not match the resource type and id").at(format!("{prefix}.fullUrl")));
                                }
                            }
                        }
                    }
                    if bundle_type != "history" {
                        if let Some(u) = full_url {
                            let version = r.pointer("/meta/versionId").and_then(Value::as_str).unwrap_or("");
                            if !seen.insert((u.to_owned(), version.to_owned())) {
                                issues.push(Issue::error(IssueCode::Duplicate, "two entries have the same fullUrl (bdl-7)").at(format!("{prefix}.fullUrl")));
                            }
                        }
                    }
                }
                Err(e) => issues.extend(e.within(&format!("{prefix}.resource")).issues),
            },
            None => {
                let method = e.pointer("/request/method").and_then(Value::as_str);
                if !matches!(method, Some("DELETE" | "GET" | "HEAD")) && matches!(bundle_type, "transaction" | "batch") {
                    issues.push(Issue::error(IssueCode::Required, "entry.resource is required for this request method").at(&prefix));
                }
            }
        }
    }
}

/// Bundles with at least this many entries have them validated on several threads.
const PARALLEL_MIN_ENTRIES: usize = 32;

/// Entries validated together, by this many per claim.
const ENTRIES_PER_CLAIM: usize = 8;

/// The verdict on each entry's resource, in entry order (None for an entry without one). A
/// large Bundle's entries are validated on as many threads as the machine has cores (or
/// [`Limits::validation_threads`]), the caller's among them: a Bundle is one request, and
/// its answer waits for all of them, while the other requests of a busy server may be
/// waiting on the database and leave a core idle. Threads claim the next few entries as they go, so a few large resources do not
/// hold one thread back; the verdicts are the same as one thread's, in the same order.
fn validate_entries<'a>(entries: &'a [Value], limits: &Limits) -> Vec<Option<Result<&'a str, FhirError>>> {
    let one = |e: &'a Value| e.get("resource").map(|r| validate_resource(r, limits));
    let cores = match limits.validation_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let threads = cores.min(entries.len() / PARALLEL_MIN_ENTRIES);
    if threads <= 1 {
        return entries.iter().map(one).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let start = next.fetch_add(ENTRIES_PER_CLAIM, std::sync::atomic::Ordering::Relaxed);
            if start >= entries.len() {
                return done;
            }
            let end = (start + ENTRIES_PER_CLAIM).min(entries.len());
            done.push((start, entries[start..end].iter().map(one).collect::<Vec<_>>()));
        }
    };
    let mut claims = std::thread::scope(|scope| {
        let others: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let mut claims = work();
        for t in others {
            match t.join() {
                Ok(c) => claims.extend(c),
                // A panic in validation is a bug; it surfaces as it would on one thread.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        claims
    });
    claims.sort_unstable_by_key(|(start, _)| *start);
    claims.into_iter().flat_map(|(_, verdicts)| verdicts).collect()
}

/// In a `document` Bundle every reference from a Composition section must resolve to
/// exactly one entry (a versioned reference through `meta.versionId`).
fn check_document_references(entries: &[Value], issues: &mut Vec<Issue>) {
    let Some(comp) = entries.first() else { return };
    let base = comp
        .get("fullUrl")
        .and_then(Value::as_str)
        .and_then(|u| u.rfind("Composition/").map(|i| u[..i].to_owned()))
        .unwrap_or_default();
    let index: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e.get("fullUrl").and_then(Value::as_str).unwrap_or(""),
                e.pointer("/resource/meta/versionId").and_then(Value::as_str).unwrap_or(""),
            )
        })
        .collect();
    let mut refs = Vec::new();
    fn sections(v: &Value, path: String, out: &mut Vec<(String, String)>) {
        if let Some(secs) = v.get("section").and_then(Value::as_array) {
            for (i, sec) in secs.iter().enumerate() {
                let p = format!("{path}.section[{i}]");
                if let Some(es) = sec.get("entry").and_then(Value::as_array) {
                    for (j, e) in es.iter().enumerate() {
                        if let Some(r) = e.get("reference").and_then(Value::as_str) {
                            out.push((format!("{p}.entry[{j}]"), r.to_owned()));
                        }
                    }
                }
                sections(sec, p, out);
            }
        }
    }
    if let Some(res) = comp.get("resource") {
        sections(res, "Bundle.entry[0].resource".to_owned(), &mut refs);
    }
    for (path, r) in refs {
        let (url, version) = match crate::parse_reference(&r) {
            crate::Reference::Literal { resource_type, id, version, absolute: false } => {
                (format!("{base}{resource_type}/{id}"), version)
            }
            crate::Reference::Literal { version, .. } => {
                (r.split("/_history/").next().unwrap_or(&r).to_owned(), version)
            }
            crate::Reference::Urn(u) => (u.to_owned(), None),
            _ => continue,
        };
        let matches = index.iter().filter(|(u, v)| *u == url && version.is_none_or(|want| want == *v)).count();
        if matches == 0 {
            issues.push(Issue::error(IssueCode::Invalid, "section entry reference does not resolve inside the document").at(path));
        } else if matches > 1 {
            issues.push(Issue::error(IssueCode::Invalid, "section entry reference matches more than one entry of the document").at(path));
        }
    }
}

/// que-12: an item with more than one enableWhen must say how they combine.
fn check_que_12(items: &Value, path: &str, issues: &mut Vec<Issue>) {
    let Some(items) = items.as_array() else { return };
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let n = item.get("enableWhen").and_then(Value::as_array).map_or(0, <[Value]>::len);
        if n > 1 && item.get("enableBehavior").is_none() {
            issues.push(Issue::error(IssueCode::Invariant, "que-12: enableBehavior is required when there is more than one enableWhen").at(&p));
        }
        if let Some(children) = item.get("item") {
            check_que_12(children, &format!("{p}.item"), issues);
        }
    }
}

/// per-1 on anything shaped like a Period: start must not be after end. With FHIRPath's
/// precision rules, values equal up to the shorter precision but of different precision
/// cannot be compared, and that fails the invariant too.
fn check_period(map: &Object, path: &Path<'_>, issues: &mut Vec<Issue>) {
    let (Some(Value::String(start)), Some(Value::String(end))) = (map.get("start"), map.get("end")) else { return };
    let (Some(ps), Some(pe)) = (date_precision(start), date_precision(end)) else { return };
    let ok = if ps == pe && ps > 10 {
        match (chrono::DateTime::parse_from_rfc3339(start), chrono::DateTime::parse_from_rfc3339(end)) {
            (Ok(a), Ok(b)) => a <= b,
            _ => true,
        }
    } else {
        let n = ps.min(pe).min(10);
        let (a, b) = (&start[..n], &end[..n]);
        a < b || (a == b && ps == pe)
    };
    if !ok {
        issues.push(Issue::error(IssueCode::Invariant, "per-1: if present, start shall have a lower or equal value than end").at(path.render()));
    }
}

/// 4, 7, 10 for year, month, date; the full length for a dateTime; None if not date-like.
fn date_precision(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.len() < 4 || !b[..4].iter().all(u8::is_ascii_digit) {
        return None;
    }
    match b.len() {
        4 | 7 | 10 => Some(b.len()),
        n if n > 10 && b[10] == b'T' => Some(n),
        _ => None,
    }
}

fn looks_like_html(s: &str) -> bool {
    s.as_bytes().windows(2).any(|w| w[0] == b'<' && (w[1].is_ascii_alphabetic() || w[1] == b'/' || w[1] == b'!'))
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| if matches!(i, 8 | 13 | 18 | 23) { b == b'-' } else { b.is_ascii_hexdigit() })
}

fn bundle_without_resources(v: &Value) -> Value {
    // Copies the Bundle's own elements only: the entries' resources (most of its size)
    // are checked one by one and never cloned.
    let Value::Object(map) = v else { return v.clone() };
    let shell = map
        .iter()
        .map(|(k, val)| match (k, val) {
            ("entry", Value::Array(entries)) => (k.into(), Value::Array(entries.iter().map(entry_shell).collect())),
            _ => (k.into(), val.clone()),
        })
        .collect();
    Value::Object(shell)
}

fn entry_shell(e: &Value) -> Value {
    let Value::Object(eo) = e else { return e.clone() };
    let shell = eo
        .iter()
        .filter(|(k, _)| *k != "resource")
        .map(|(k, val)| match (k, val) {
            ("response", Value::Object(resp)) => {
                (k.into(), Value::Object(resp.iter().filter(|(k, _)| *k != "outcome").map(|(k, v)| (k.into(), v.clone())).collect()))
            }
            _ => (k.into(), val.clone()),
        })
        .collect();
    Value::Object(shell)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: serde_json::Value) -> Result<(), FhirError> {
        let v = Value::from(v);
        validate_resource(&v, &Limits::default()).map(|_| ())
    }

    #[test]
    fn ids_follow_the_fhir_id_rule() {
        assert!(is_valid_id("a-1.b"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("has space"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn missing_and_unknown_resource_types_are_rejected() {
        assert_eq!(check(json!({"id": "x"})).unwrap_err().code(), IssueCode::Required);
        assert_eq!(check(json!({"resourceType": "Patientt"})).unwrap_err().code(), IssueCode::Invalid);
        assert_eq!(check(json!({"resourceType": 5})).unwrap_err().code(), IssueCode::Structure);
        assert_eq!(check(json!([{"resourceType": "Patient"}])).unwrap_err().code(), IssueCode::Structure);
    }

    #[test]
    fn whitespace_only_and_control_characters_are_rejected() {
        for (bad, why) in [(" \t\r\n", "blank"), ("\u{a0}\u{2003}", "non-ASCII blank"), ("a\u{1}b", "C0"), ("a\u{7f}", "DEL"), ("x\u{85}", "C1")] {
            assert!(string_content_issue(bad).is_some(), "{why}");
        }
        for good in ["a", " a ", "line\r\nnext\tcol", "Zoë \u{a0}x", "\u{a0}é", "日本"] {
            assert_eq!(string_content_issue(good), None, "{good:?}");
        }
        // Same answers as the char-level rules they replace.
        let ascii: Vec<String> = (0u8..0x80).flat_map(|c| [format!("{}", c as char), format!("ab{}  ", c as char), format!("  {}", c as char)]).collect();
        for s in ["\u{9f}", "\u{a0}", "é\u{80}", "\u{2028}", " \u{1}", "   ", "~}|{"].into_iter().chain(ascii.iter().map(String::as_str)) {
            let old = if s.trim().is_empty() {
                Some("blank")
            } else if s.chars().any(|c| c.is_control() && !matches!(c, '\r' | '\n' | '\t')) {
                Some("control")
            } else {
                None
            };
            assert_eq!(string_content_issue(s).is_some(), old.is_some(), "{s:?}");
        }
    }

    #[test]
    fn empty_values_are_rejected() {
        assert!(check(json!({"resourceType": "Patient", "name": []})).is_err());
        assert!(check(json!({"resourceType": "Patient", "name": [{}]})).is_err());
        assert!(check(json!({"resourceType": "Patient", "gender": ""})).is_err());
    }

    #[test]
    fn attachment_size_must_match_its_data() {
        let bad = json!({"resourceType": "Media", "status": "completed", "content": {"data": "aGVsbG8=", "size": 4}});
        let err = check(bad).unwrap_err();
        assert_eq!(err.issues[0].expression.as_deref(), Some("Media.content.size"));
        let good = json!({"resourceType": "Media", "status": "completed", "content": {"data": "aGVsbG8=", "size": 5}});
        check(good).unwrap();
    }

    #[test]
    fn script_in_narrative_is_a_security_issue() {
        let v = json!({"resourceType": "Patient", "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p onclick=\"x()\">hi</p></div>"}});
        assert_eq!(check(v).unwrap_err().code(), IssueCode::Invariant);
    }

    #[test]
    fn duplicate_full_urls_in_a_bundle_are_rejected() {
        let p = json!({"resourceType": "Patient"});
        let v = json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": "urn:uuid:6f1e0c1e-1b0a-4c4f-9a55-000000000001", "resource": p},
            {"fullUrl": "urn:uuid:6f1e0c1e-1b0a-4c4f-9a55-000000000001", "resource": p}]});
        assert_eq!(check(v).unwrap_err().code(), IssueCode::Duplicate);
    }

    #[test]
    fn a_large_bundle_gets_the_same_verdict_on_several_threads_as_on_one() {
        // 200 entries, every seventh resource invalid (an empty string or an unknown element,
        // alternately), one entry not an object: the issues, their order and their
        // locations must not depend on threads.
        let entries: Vec<serde_json::Value> = (0..200)
            .map(|i| match i % 7 {
                0 if i % 2 == 0 => json!({"fullUrl": format!("urn:uuid:6f1e0c1e-1b0a-4c4f-9a55-{i:012}"), "resource": {"resourceType": "Patient", "gender": ""}}),
                0 => json!({"fullUrl": format!("urn:uuid:6f1e0c1e-1b0a-4c4f-9a55-{i:012}"), "resource": {"resourceType": "Patient", "unknownThing": true}}),
                _ if i == 101 => json!("not an entry"),
                _ => json!({"fullUrl": format!("urn:uuid:6f1e0c1e-1b0a-4c4f-9a55-{i:012}"), "resource": {"resourceType": "Patient", "id": format!("p{i}"), "active": true}}),
            })
            .collect();
        let bundle = Value::from(json!({"resourceType": "Bundle", "type": "collection", "entry": entries}));
        let on = |threads| validate_resource(&bundle, &Limits { validation_threads: threads, ..Limits::default() }).unwrap_err();
        let one = on(1);
        assert_eq!(one.issues.len(), 15 + 14 + 1, "{:?}", one.issues);
        let located: Vec<_> = one.issues.iter().map(|i| i.expression.clone().unwrap_or_default()).collect();
        assert_eq!(located[0], "Bundle.entry[0].resource.gender");
        assert!(located.contains(&"Bundle.entry[101]".to_owned()), "{located:?}");
        for threads in [2, 3, 8] {
            assert_eq!(on(threads), one, "{threads} threads");
        }
        let valid = Value::from(json!({"resourceType": "Bundle", "type": "collection", "entry": (0..100)
            .map(|i| json!({"resource": {"resourceType": "Patient", "id": format!("p{i}")}}))
            .collect::<Vec<_>>()}));
        assert_eq!(validate_resource(&valid, &Limits { validation_threads: 4, ..Limits::default() }), Ok("Bundle"));
    }
}
