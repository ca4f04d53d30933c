//! From validated entries to store writes: id assignment, conditional create/update,
//! reference resolution (urn:uuid, conditional, literal) and the derived index rows.

use std::collections::{HashMap, HashSet};

use chartline_fhir::{
    CanonicalJson, Json as Value, FhirError, Issue, IssueCode, Reference, extract_events, for_each_link_mut, is_valid_id, Link, LinkPath,
    parse_reference, patient_of,
};
use chartline_store::{ResourceWrite, StoreTx, WriteOutcome};
use chrono::{DateTime, Utc};

use crate::IngestError;

/// What an entry asks for.
#[derive(Debug, Clone)]
pub(crate) enum Method {
    /// Create; `if_none_exist` makes it conditional.
    Post { if_none_exist: Option<String> },
    /// Create or update at a known id.
    Put { id: String },
    /// Update the one match of a search, or create when none.
    ConditionalPut { query: String },
    /// Delete at a known id.
    Delete { id: String },
}

/// One unit of work: a Bundle entry, a REST call, an NDJSON line.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Position in the request (for error locations and response order).
    pub index: usize,
    /// Where errors point, e.g. `Bundle.entry[3]`.
    pub location: String,
    pub full_url: Option<String>,
    pub resource_type: String,
    pub method: Method,
    pub resource: Option<Value>,
}

/// How one entry ended.
#[derive(Debug, Clone)]
pub(crate) struct EntryResult {
    pub index: usize,
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub last_updated: Option<DateTime<Utc>>,
    /// None for a conditional create that matched, or a delete.
    pub outcome: Option<WriteOutcome>,
    pub status: &'static str,
}

/// Reference rules for one request.
pub(crate) struct Policy {
    /// Literal `Type/id` references must resolve to the request or the store (transactions).
    pub literal_refs_must_exist: bool,
}

enum Action {
    Write,
    Matched,
    Delete,
}

struct Target {
    entry: usize,
    id: String,
    action: Action,
    /// The id came from the client (urn:uuid or resource.id) on a create: it is kept only
    /// if free, or if it holds identical content (a re-send).
    provisional: bool,
}

/// Resolves and writes `entries` inside `tx`. `known` maps fullUrls resolved earlier in
/// the same request (batch) and gains this call's. On error nothing of this call is kept
/// by the caller (it drops `tx`).
pub(crate) async fn apply(
    tx: &mut StoreTx,
    mut entries: Vec<Entry>,
    known: &mut HashMap<String, (String, String)>,
    policy: &Policy,
    ingest_id: Option<i64>,
) -> Result<Vec<EntryResult>, IngestError> {
    // 1. Targets: which id each entry lands on. Conditional creates and updates lock their
    //    queries and search the store together (one statement each, not two per entry).
    let conditional: Vec<(usize, &str, &str)> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match &e.method {
            Method::Post { if_none_exist: Some(q) } | Method::ConditionalPut { query: q } => {
                Some((i, e.resource_type.as_str(), q.as_str()))
            }
            _ => None,
        })
        .collect();
    let mut found_for: HashMap<usize, Vec<String>> = HashMap::new();
    if !conditional.is_empty() {
        let criteria = conditional
            .iter()
            .map(|&(i, ty, q)| Ok((ty, parse_query(q, &entries[i].location)?)))
            .collect::<Result<Vec<_>, IngestError>>()?;
        tx.lock_keys(&conditional.iter().map(|(_, ty, q)| format!("{ty}?{q}")).collect::<Vec<_>>()).await?;
        let found = search_all(tx, &criteria).await?;
        found_for.extend(conditional.iter().map(|&(i, _, _)| i).zip(found));
    }
    let mut targets = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let (id, action, provisional) = match &e.method {
            Method::Post { if_none_exist: Some(_) } => match found_for.get(&i).map(Vec::as_slice).unwrap_or_default() {
                [] => {
                    let (id, p) = candidate_id(e);
                    (id, Action::Write, p)
                }
                [one] => (one.clone(), Action::Matched, false),
                _ => return Err(multiple(&e.location, "ifNoneExist")),
            },
            Method::Post { if_none_exist: None } => {
                let (id, p) = candidate_id(e);
                (id, Action::Write, p)
            }
            Method::Put { id } => (id.clone(), Action::Write, false),
            Method::ConditionalPut { .. } => match found_for.get(&i).map(Vec::as_slice).unwrap_or_default() {
                [] => {
                    let (id, p) = candidate_id(e);
                    (id, Action::Write, p)
                }
                [one] => (one.clone(), Action::Write, false),
                _ => return Err(multiple(&e.location, "the conditional update")),
            },
            Method::Delete { id } => (id.clone(), Action::Delete, false),
        };
        targets.push(Target { entry: i, id, action, provisional });
    }
    {
        let mut seen = HashSet::new();
        for t in &targets {
            let e = &entries[t.entry];
            if !matches!(t.action, Action::Matched) && !seen.insert((e.resource_type.as_str(), t.id.as_str())) {
                return Err(FhirError::at(
                    IssueCode::Duplicate,
                    &e.location,
                    "two entries of this request address the same resource",
                )
                .into());
            }
        }
    }

    // 2. Client-chosen ids on creates: kept when free or holding identical content.
    let provisional_keys: Vec<(String, String)> = targets
        .iter()
        .filter(|t| t.provisional)
        .map(|t| (entries[t.entry].resource_type.clone(), t.id.clone()))
        .collect();
    let taken = if provisional_keys.is_empty() { HashMap::new() } else { tx.current_hashes(&provisional_keys).await? };
    let originals: Option<Vec<Option<Value>>> =
        if taken.is_empty() { None } else { Some(entries.iter().map(|e| e.resource.clone()).collect()) };

    let mut writes;
    loop {
        register(&entries, &targets, known);
        resolve_references(tx, &mut entries, &targets, known, policy).await?;
        writes = Vec::with_capacity(targets.len());
        let mut reassigned = false;
        for t in &mut targets {
            if !matches!(t.action, Action::Write) {
                continue;
            }
            let e = &entries[t.entry];
            let Some(resource) = &e.resource else { continue };
            let canonical = CanonicalJson::of(resource);
            if t.provisional {
                if let Some(existing) = taken.get(&(e.resource_type.clone(), t.id.clone())) {
                    if existing.as_slice() != canonical.sha256().as_slice() {
                        t.id = uuid::Uuid::new_v4().to_string();
                        t.provisional = false;
                        reassigned = true;
                    }
                }
            }
            writes.push((t.entry, canonical));
        }
        if !reassigned {
            break;
        }
        // An id was taken by other content: start over from the originals with the new ids.
        if let Some(orig) = &originals {
            for (e, o) in entries.iter_mut().zip(orig) {
                e.resource = o.clone();
            }
        }
    }

    // 3. Deletes, then writes in key order.
    let mut results: Vec<Option<EntryResult>> = vec![None; entries.len()];
    for t in &targets {
        let e = &entries[t.entry];
        match t.action {
            Action::Delete => {
                let v = tx.delete(&e.resource_type, &t.id, ingest_id).await?;
                results[t.entry] = Some(EntryResult {
                    index: e.index,
                    resource_type: e.resource_type.clone(),
                    id: t.id.clone(),
                    version_id: v.unwrap_or(0),
                    last_updated: v.map(|_| tx.now()),
                    outcome: None,
                    status: if v.is_some() { "200 OK" } else { "204 No Content" },
                });
            }
            Action::Matched => {
                results[t.entry] = Some(EntryResult {
                    index: e.index,
                    resource_type: e.resource_type.clone(),
                    id: t.id.clone(),
                    version_id: 0,
                    last_updated: None,
                    outcome: None,
                    status: "200 OK",
                });
            }
            Action::Write => {}
        }
    }
    let target_of: HashMap<usize, &Target> = targets.iter().map(|t| (t.entry, t)).collect();
    let mut order: Vec<(usize, CanonicalJson)> = writes;
    order.sort_by(|a, b| {
        let (ea, eb) = (&entries[a.0], &entries[b.0]);
        (ea.resource_type.as_str(), target_of[&a.0].id.as_str()).cmp(&(eb.resource_type.as_str(), target_of[&b.0].id.as_str()))
    });
    let mut batch = Vec::with_capacity(order.len());
    let mut batch_entries = Vec::with_capacity(order.len());
    for (i, canonical) in order {
        let e = &mut entries[i];
        let Some(resource) = e.resource.take() else { continue };
        batch.push(to_write(&e.resource_type, &target_of[&i].id, &resource, canonical));
        batch_entries.push(i);
    }
    let written = tx.write(batch, ingest_id).await?;
    for (i, w) in batch_entries.into_iter().zip(written) {
        results[i] = Some(EntryResult {
            index: entries[i].index,
            resource_type: w.resource_type,
            id: w.id,
            version_id: w.version_id,
            last_updated: Some(w.last_updated),
            status: match w.outcome {
                WriteOutcome::Created => "201 Created",
                _ => "200 OK",
            },
            outcome: Some(w.outcome),
        });
    }
    Ok(results.into_iter().flatten().collect())
}

/// Whether a batch's entries can be applied together, with the same outcome as one by one
/// in order: no conditional create or update that another entry of the batch could satisfy
/// (entry by entry, the later one would find the earlier one's resource). Entries that
/// address the same resource are refused by [`apply`] itself, which sends the batch back
/// to the entry-by-entry path.
pub(crate) fn independent(entries: &[Entry]) -> bool {
    // What each entry would be found by: its identifiers and the id it asks for.
    let mut by_identifier: HashMap<(&str, String), Vec<(usize, String)>> = HashMap::new();
    let mut by_id: HashMap<(&str, String), usize> = HashMap::new();
    let mut conditional = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if let Some(r) = &e.resource {
            for (system, value) in identifiers(r) {
                by_identifier.entry((e.resource_type.as_str(), value)).or_default().push((i, system));
            }
            by_id.insert((e.resource_type.as_str(), candidate_id(e).0), i);
        }
        if let Method::Post { if_none_exist: Some(q) } | Method::ConditionalPut { query: q } = &e.method {
            conditional.push((i, q));
        }
    }
    let mut queries = HashSet::new();
    for (i, query) in conditional {
        let e = &entries[i];
        if !queries.insert((e.resource_type.as_str(), query.as_str())) {
            return false;
        }
        let satisfied_by_another = match parse_query(query, &e.location) {
            Err(_) => return false,
            Ok(Criterion::Identifier { system, value }) => by_identifier
                .get(&(e.resource_type.as_str(), value))
                .is_some_and(|found| found.iter().any(|(j, s)| *j != i && system.as_ref().is_none_or(|want| want == s))),
            Ok(Criterion::Id(id)) => by_id.get(&(e.resource_type.as_str(), id)).is_some_and(|&j| j != i),
        };
        if satisfied_by_another {
            return false;
        }
    }
    true
}

fn multiple(location: &str, what: &str) -> IngestError {
    FhirError::at(IssueCode::MultipleMatches, location, format!("{what} matches more than one resource")).into()
}

/// The id a create asks for: the UUID of a `urn:uuid:` fullUrl, else the resource's own id,
/// else a fresh UUID. The first two are provisional (see [`Target::provisional`]).
fn candidate_id(e: &Entry) -> (String, bool) {
    if let Some(u) = e.full_url.as_deref().and_then(|u| u.strip_prefix("urn:uuid:")) {
        if is_valid_id(u) {
            return (u.to_ascii_lowercase(), true);
        }
    }
    if let Some(id) = e.resource.as_ref().and_then(|r| r.get("id")).and_then(Value::as_str) {
        if is_valid_id(id) {
            return (id.to_owned(), true);
        }
    }
    (uuid::Uuid::new_v4().to_string(), false)
}

fn register(entries: &[Entry], targets: &[Target], known: &mut HashMap<String, (String, String)>) {
    for t in targets {
        let e = &entries[t.entry];
        if let Some(u) = &e.full_url {
            known.insert(u.clone(), (e.resource_type.clone(), t.id.clone()));
        }
    }
}

async fn resolve_references(
    tx: &mut StoreTx,
    entries: &mut [Entry],
    targets: &[Target],
    known: &HashMap<String, (String, String)>,
    policy: &Policy,
) -> Result<(), IngestError> {
    // One walk per resource: urn:uuid and absolute references and url elements are
    // rewritten, literal references noted for the existence check, and conditional
    // references collected; those are resolved together afterwards (one query for the
    // request) and written in a second walk over only the resources that hold any.
    let mut wanted: Vec<(String, String)> = Vec::new();
    let mut seen = HashSet::new();
    let mut with_conditional = Vec::new();
    let mut literals: Vec<((String, String), String)> = Vec::new();
    let in_request: HashSet<(String, String)> =
        targets.iter().map(|t| (entries[t.entry].resource_type.clone(), t.id.clone())).collect();
    for t in targets {
        if !matches!(t.action, Action::Write) {
            continue;
        }
        let location = entries[t.entry].location.clone();
        let e = &mut entries[t.entry];
        let id = t.id.clone();
        let rtype = e.resource_type.clone();
        let Some(resource) = e.resource.as_mut() else { continue };
        if let Value::Object(m) = resource {
            m.insert("id", Value::String(id.into_boxed_str()));
        }
        let prefix = format!("{location}.resource");
        let mut conditional_here = false;
        for_each_link_mut(resource, &mut |link, path, s| -> Result<(), IngestError> {
            if link == Link::Url {
                rewrite_url(s, known);
                return Ok(());
            }
            let at = || located(&prefix, &rtype, path);
            match parse_reference(s) {
                Reference::Urn(u) => match known.get(u) {
                    Some((ty, id)) => *s = format!("{ty}/{id}").into(),
                    None => {
                        return Err(FhirError::at(IssueCode::NotFound, at(), "reference to a urn that no entry of this Bundle carries").into());
                    }
                },
                Reference::Conditional { .. } => {
                    conditional_here = true;
                    if seen.insert(s.to_string()) {
                        wanted.push((s.to_string(), location.clone()));
                    }
                }
                Reference::Literal { absolute: true, .. } => {
                    if let Some((ty, id)) = known.get(&**s) {
                        *s = format!("{ty}/{id}").into();
                    }
                }
                Reference::Literal { resource_type, id, absolute: false, .. } if policy.literal_refs_must_exist => {
                    let key = (resource_type.to_owned(), id.to_owned());
                    if !in_request.contains(&key) {
                        literals.push((key, at()));
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        if conditional_here {
            with_conditional.push(t.entry);
        }
    }
    let conditional = resolve_conditionals(tx, &wanted, entries, targets).await?;
    for i in with_conditional {
        let prefix = format!("{}.resource", entries[i].location);
        let e = &mut entries[i];
        let rtype = e.resource_type.clone();
        let Some(resource) = e.resource.as_mut() else { continue };
        for_each_link_mut(resource, &mut |link, path, s| -> Result<(), IngestError> {
            if link != Link::Reference || !matches!(parse_reference(s), Reference::Conditional { .. }) {
                return Ok(());
            }
            match conditional.get(&**s) {
                Some(Ok(r)) => *s = r.as_str().into(),
                Some(Err(e)) => return Err(relocate(e, &located(&prefix, &rtype, path))),
                None => {}
            }
            Ok(())
        })?;
    }
    if !literals.is_empty() {
        let keys: Vec<(String, String)> = literals.iter().map(|(k, _)| k.clone()).collect();
        let found = tx.existing(&keys).await?;
        if let Some((_, at)) = literals.iter().find(|(k, _)| !found.contains(k)) {
            return Err(FhirError::at(IssueCode::NotFound, at.clone(), "reference resolves to no stored resource and no entry of this Bundle").into());
        }
    }
    Ok(())
}

/// Where an error points: the entry's `….resource` followed by the element's path in the
/// resource (`Bundle.entry[3].resource.subject.reference`).
fn located(prefix: &str, resource_type: &str, path: &LinkPath<'_>) -> String {
    let path = path.render();
    format!("{prefix}{}", path.strip_prefix(resource_type).unwrap_or(&path))
}

/// FHIR's transaction rule for elements of type url: a `url` (an Attachment's above all)
/// that spells the fullUrl of an entry of this request (`urn:uuid:…` or absolute) becomes
/// that entry's `Type/id`, as references do. Other urls are left as sent.
fn rewrite_url(s: &mut Box<str>, known: &HashMap<String, (String, String)>) {
    if let Some((ty, id)) = known.get(&**s) {
        *s = format!("{ty}/{id}").into();
    }
}

fn relocate(e: &IngestError, at: &str) -> IngestError {
    match e {
        IngestError::Invalid(f) => IngestError::Invalid(FhirError {
            issues: f.issues.iter().cloned().map(|i| Issue { expression: Some(at.to_owned()), ..i }).collect(),
        }),
        IngestError::Store(_) => IngestError::invalid(IssueCode::Exception, "conditional reference could not be resolved"),
    }
}

/// `Type?identifier=system|value` references (each with the location of the entry that
/// first holds it): one match in the store, else in this request's entries. The store is
/// searched once for all of them.
async fn resolve_conditionals(
    tx: &mut StoreTx,
    references: &[(String, String)],
    entries: &[Entry],
    targets: &[Target],
) -> Result<HashMap<String, Result<String, IngestError>>, IngestError> {
    let mut resolved = HashMap::with_capacity(references.len());
    let (mut searched, mut criteria) = (Vec::new(), Vec::new());
    for (reference, location) in references {
        let Reference::Conditional { resource_type, query } = parse_reference(reference) else { continue };
        match parse_query(query, location) {
            Ok(c) => {
                searched.push((reference, location));
                criteria.push((resource_type, c));
            }
            Err(e) => {
                resolved.insert(reference.clone(), Err(e));
            }
        }
    }
    let found = search_all(tx, &criteria).await?;
    for (((reference, location), &(resource_type, ref crit)), mut found) in searched.into_iter().zip(&criteria).zip(found) {
        if found.is_empty() {
            for t in targets {
                let e = &entries[t.entry];
                if e.resource_type == resource_type && e.resource.as_ref().is_some_and(|r| matches(r, &t.id, crit)) {
                    found.push(t.id.clone());
                }
            }
        }
        let outcome = match found.as_slice() {
            [one] => Ok(format!("{resource_type}/{one}")),
            [] => Err(FhirError::at(IssueCode::NotFound, location.as_str(), "conditional reference matches no resource").into()),
            _ => Err(FhirError::at(IssueCode::MultipleMatches, location.as_str(), "conditional reference matches more than one resource").into()),
        };
        resolved.insert(reference.clone(), outcome);
    }
    Ok(resolved)
}

enum Criterion {
    Identifier { system: Option<String>, value: String },
    Id(String),
}

fn parse_query(query: &str, location: &str) -> Result<Criterion, IngestError> {
    let unsupported = || {
        IngestError::Invalid(FhirError::at(
            IssueCode::NotSupported,
            location,
            "only `identifier=[system|]value` and `_id=` are supported in conditional operations",
        ))
    };
    if query.contains('&') {
        return Err(unsupported());
    }
    let (name, raw) = query.split_once('=').ok_or_else(unsupported)?;
    let value = percent_decode(raw);
    match name {
        "identifier" => Ok(match value.split_once('|') {
            Some((s, v)) => Criterion::Identifier { system: (!s.is_empty()).then(|| s.to_owned()), value: v.to_owned() },
            None => Criterion::Identifier { system: None, value },
        }),
        "_id" => Ok(Criterion::Id(value)),
        _ => Err(unsupported()),
    }
}

fn matches(resource: &Value, id: &str, c: &Criterion) -> bool {
    match c {
        Criterion::Id(want) => id == want,
        Criterion::Identifier { system, value } => identifiers(resource)
            .iter()
            .any(|(s, v)| v == value && system.as_ref().is_none_or(|want| want == s)),
    }
}

/// The ids of current resources matching each (type, criterion), in one statement per
/// kind of criterion.
async fn search_all(tx: &mut StoreTx, criteria: &[(&str, Criterion)]) -> Result<Vec<Vec<String>>, IngestError> {
    let mut found = vec![Vec::new(); criteria.len()];
    let (mut by_identifier, mut at_identifier) = (Vec::new(), Vec::new());
    let (mut by_id, mut at_id) = (Vec::new(), Vec::new());
    for (n, (ty, c)) in criteria.iter().enumerate() {
        match c {
            Criterion::Identifier { system, value } => {
                by_identifier.push((*ty, system.as_deref(), value.as_str()));
                at_identifier.push(n);
            }
            Criterion::Id(id) => {
                by_id.push(((*ty).to_owned(), id.clone()));
                at_id.push(n);
            }
        }
    }
    if !by_identifier.is_empty() {
        for (n, ids) in at_identifier.into_iter().zip(tx.find_by_identifiers(&by_identifier).await?) {
            found[n] = ids;
        }
    }
    if !by_id.is_empty() {
        let existing = tx.existing(&by_id).await?;
        for (n, key) in at_id.into_iter().zip(by_id) {
            if existing.contains(&key) {
                found[n] = vec![key.1];
            }
        }
    }
    Ok(found)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (system, value) of the resource's `identifier` list ("" when no system).
pub(crate) fn identifiers(resource: &Value) -> Vec<(String, String)> {
    let list = match resource.get("identifier") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v @ Value::Object(_)) => vec![v],
        _ => Vec::new(),
    };
    list.into_iter()
        .filter_map(|i| {
            let value = i.get("value")?.as_str()?;
            Some((i.get("system").and_then(Value::as_str).unwrap_or("").to_owned(), value.to_owned()))
        })
        .collect()
}

/// The store's view of a resolved resource.
pub(crate) fn to_write(resource_type: &str, id: &str, resource: &Value, canonical: CanonicalJson) -> ResourceWrite {
    ResourceWrite {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        patient_id: patient_of(resource),
        events: extract_events(resource),
        identifiers: identifiers(resource),
        canonical,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditional_queries_parse_system_and_value() {
        match parse_query("identifier=http://hl7.org/fhir/sid/us-npi%7C999", "x").ok() {
            Some(Criterion::Identifier { system, value }) => {
                assert_eq!(system.as_deref(), Some("http://hl7.org/fhir/sid/us-npi"));
                assert_eq!(value, "999");
            }
            _ => panic!("identifier query must parse"),
        }
        assert!(parse_query("name=smith", "x").is_err(), "unsupported parameters are refused, not ignored");
        assert!(parse_query("identifier=a&_id=b", "x").is_err());
    }

    #[test]
    fn attachment_urls_naming_a_bundle_entry_are_rewritten() {
        let known: HashMap<String, (String, String)> = [
            ("urn:uuid:0b5e4b2a-8a4c-4c7e-9d8e-1f2a3b4c5d6e".to_owned(), ("Binary".to_owned(), "b1".to_owned())),
            ("http://ehr.example/fhir/Binary/b2".to_owned(), ("Binary".to_owned(), "b2".to_owned())),
        ]
        .into();
        let mut v = Value::from(serde_json::json!({
            "resourceType": "DocumentReference",
            "content": [
                {"attachment": {"contentType": "image/png", "url": "urn:uuid:0b5e4b2a-8a4c-4c7e-9d8e-1f2a3b4c5d6e"}},
                {"attachment": {"contentType": "image/png", "url": "http://ehr.example/fhir/Binary/b2"}},
                {"attachment": {"contentType": "image/png", "url": "https://pacs.example/1.png"}}
            ],
            "extension": [{"url": "http://example.org/ext", "valueString": "urn:uuid:0b5e4b2a-8a4c-4c7e-9d8e-1f2a3b4c5d6e"}]
        }));
        for_each_link_mut::<()>(&mut v, &mut |link, _, s| {
            if link == Link::Url {
                rewrite_url(s, &known);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(v["content"][0]["attachment"]["url"], "Binary/b1");
        assert_eq!(v["content"][1]["attachment"]["url"], "Binary/b2");
        assert_eq!(v["content"][2]["attachment"]["url"], "https://pacs.example/1.png");
        assert_eq!(v["extension"][0]["url"], "http://example.org/ext");
        assert_eq!(v["extension"][0]["valueString"], "urn:uuid:0b5e4b2a-8a4c-4c7e-9d8e-1f2a3b4c5d6e", "only url elements");
    }

    #[test]
    fn urn_uuid_full_urls_give_their_uuid_as_the_id() {
        let e = Entry {
            index: 0,
            location: "Bundle.entry[0]".into(),
            full_url: Some("urn:uuid:4B86BEFA-fa7e-9285-615f-e081dab3f93c".into()),
            resource_type: "Patient".into(),
            method: Method::Post { if_none_exist: None },
            resource: Some(Value::from(serde_json::json!({"resourceType": "Patient"}))),
        };
        assert_eq!(candidate_id(&e), ("4b86befa-fa7e-9285-615f-e081dab3f93c".to_owned(), true));
    }
}
