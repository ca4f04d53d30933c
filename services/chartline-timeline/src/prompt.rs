//! Rendering and budgeting.
//!
//! Budget rule: the instructions and the patient header always stay (a budget too small for
//! them is an error). Every other line has a priority; lines are taken in priority order
//! (ties: section order, then position) while they fit, and a line that does not fit is
//! skipped (a shorter, lower one may still fit). Priorities, highest first:
//!
//! | lines | priority |
//! |---|---|
//! | active allergies | 95 |
//! | active problems | 90 |
//! | active medications | 85 |
//! | lab results that are abnormal or changing (first vs last ±5 %) | 75 (else 45) |
//! | vital signs that are abnormal or changing | 70 (else 50) |
//! | recent notes, newest first | 60, −2 per older note |
//! | imaging | 55 |
//! | active care plans | 40 |
//! | procedures | 35 |
//! | immunizations | 30 |
//! | encounters | 25 |
//! | resolved problems | 20 |
//! | stopped medications | 15 |
//!
//! Within a class, more recent lines rank higher (a bonus below 5). A closing line names
//! what was omitted. The whole text is then counted by the tokenizer; if joining lines
//! changed the count past the budget, the lowest kept line goes until it fits.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::sections::{Input, Line, SECTIONS, Task, lines};
use crate::{TimelineError, TokenCounter};

/// Version of the prompt layout; part of provenance. Bump when the text changes shape.
pub const TEMPLATE_VERSION: &str = "chart_summary/1";

/// A resource version a prompt cites.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Citation {
    /// Resource type.
    pub resource_type: String,
    /// Logical id.
    pub id: String,
    /// Version cited.
    pub version_id: i64,
}

/// One rendered section.
#[derive(Debug, Clone)]
pub struct Section {
    /// Stable key.
    pub key: &'static str,
    /// Title as rendered.
    pub title: &'static str,
    /// IPS LOINC code, or empty.
    pub loinc: &'static str,
    /// The section's text (title line and kept lines).
    pub text: String,
    /// Tokens of `text`.
    pub token_count: usize,
    /// Lines kept.
    pub lines_included: usize,
    /// Lines left out for the budget.
    pub lines_omitted: usize,
}

/// A built prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// The task.
    pub task: Task,
    /// The full text.
    pub text: String,
    /// Tokens of `text`, by the model's tokenizer; never over the budget.
    pub token_count: usize,
    /// The tokenizer that counted.
    pub tokenizer: String,
    /// Sections with at least one candidate line, in render order.
    pub sections: Vec<Section>,
    /// Every cited resource version (sorted, unique), the Patient included.
    pub citations: Vec<Citation>,
    /// Lines omitted per section key (only sections that lost lines).
    pub omitted: BTreeMap<String, usize>,
    /// [`TEMPLATE_VERSION`].
    pub template_version: &'static str,
    /// sha256 of `text`, hex.
    pub sha256: String,
    /// The moment the chart was read at.
    pub as_of: chrono::DateTime<chrono::Utc>,
}

fn section_title(i: usize) -> String {
    let s = &SECTIONS[i];
    if s.loinc.is_empty() { format!("## {}", s.title) } else { format!("## {} (LOINC {})", s.title, s.loinc) }
}

fn render(fixed: &[String], candidates: &[Line], kept: &[bool], omitted_note: Option<&str>) -> String {
    let mut out = fixed.join("\n");
    for (si, _) in SECTIONS.iter().enumerate() {
        let mut ls: Vec<&Line> = candidates.iter().zip(kept).filter(|(l, k)| **k && l.section == si).map(|(l, _)| l).collect();
        if ls.is_empty() {
            continue;
        }
        ls.sort_by_key(|l| l.order);
        out.push_str("\n\n");
        out.push_str(&section_title(si));
        for l in ls {
            out.push('\n');
            out.push_str(&l.text);
        }
    }
    if let Some(n) = omitted_note {
        out.push_str("\n\n");
        out.push_str(n);
    }
    out.push('\n');
    out
}

fn omitted_note(candidates: &[Line], kept: &[bool]) -> Option<String> {
    let mut per: Vec<(usize, usize)> = Vec::new();
    for (si, _) in SECTIONS.iter().enumerate() {
        let n = candidates.iter().zip(kept).filter(|(l, k)| !**k && l.section == si).count();
        if n > 0 {
            per.push((si, n));
        }
    }
    if per.is_empty() {
        return None;
    }
    let parts: Vec<String> = per.iter().map(|(si, n)| format!("{} {}", n, SECTIONS[*si].title.to_lowercase())).collect();
    Some(format!("Omitted for length: {}.", parts.join(", ")))
}

/// Chart text that spells a chat-control token (a note quoting `<end_of_turn>`) would end
/// the user turn early; such tokens are written with look-alike brackets instead.
fn defuse(text: &str) -> String {
    const CONTROL: &[&str] = &[
        "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>",
        "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    ];
    let mut out = text.to_owned();
    for c in CONTROL {
        if out.contains(c) {
            out = out.replace(c, &format!("‹{}›", &c[1..c.len() - 1]));
        }
    }
    out
}

pub(crate) fn build(input: &Input<'_>, task: Task, budget: usize, counter: &dyn TokenCounter) -> Result<Prompt, TimelineError> {
    let (fixed, mut candidates) = lines(input, task);
    let fixed: Vec<String> = fixed.iter().map(|l| defuse(l)).collect();
    for l in &mut candidates {
        l.text = defuse(&l.text);
    }
    let fixed_cost = counter.count(&(fixed.join("\n") + "\n"));
    // Room for the closing omission line, so it never pushes the prompt over.
    let reserve = 48;
    if fixed_cost + reserve > budget {
        return Err(TimelineError::InvalidArgument(format!(
            "token_budget {budget} is below the {} tokens this task's instructions and patient header need",
            fixed_cost + reserve
        )));
    }
    let title_cost: Vec<usize> = (0..SECTIONS.len()).map(|i| counter.count(&format!("\n\n{}", section_title(i)))).collect();
    let line_cost: Vec<usize> = candidates.iter().map(|l| counter.count(&format!("\n{}", l.text))).collect();

    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        let (la, lb) = (&candidates[a], &candidates[b]);
        lb.priority.total_cmp(&la.priority).then(la.section.cmp(&lb.section)).then(la.order.cmp(&lb.order))
    });
    let mut kept = vec![false; candidates.len()];
    let mut opened = vec![false; SECTIONS.len()];
    let mut used = fixed_cost + reserve;
    for &i in &order {
        let s = candidates[i].section;
        let cost = line_cost[i] + if opened[s] { 0 } else { title_cost[s] };
        if used + cost <= budget {
            used += cost;
            kept[i] = true;
            opened[s] = true;
        }
    }
    // Exact count of the joined text; drop from the bottom of the priority order until it fits.
    let (text, token_count) = loop {
        let note = omitted_note(&candidates, &kept);
        let text = render(&fixed, &candidates, &kept, note.as_deref());
        let n = counter.count(&text);
        if n <= budget {
            break (text, n);
        }
        match order.iter().rev().find(|&&i| kept[i]) {
            Some(&i) => kept[i] = false,
            None => {
                return Err(TimelineError::InvalidArgument(format!("token_budget {budget} cannot hold this task's header")));
            }
        }
    };

    let mut sections = Vec::new();
    let mut omitted = BTreeMap::new();
    for (si, spec) in SECTIONS.iter().enumerate() {
        let total = candidates.iter().filter(|l| l.section == si).count();
        if total == 0 {
            continue;
        }
        let mut ls: Vec<&Line> = candidates.iter().zip(&kept).filter(|(l, k)| **k && l.section == si).map(|(l, _)| l).collect();
        ls.sort_by_key(|l| l.order);
        let included = ls.len();
        let stext = if included == 0 {
            String::new()
        } else {
            let mut t = section_title(si);
            for l in &ls {
                t.push('\n');
                t.push_str(&l.text);
            }
            t
        };
        if total > included {
            omitted.insert(spec.key.to_owned(), total - included);
        }
        sections.push(Section {
            key: spec.key,
            title: spec.title,
            loinc: spec.loinc,
            token_count: if stext.is_empty() { 0 } else { counter.count(&stext) },
            text: stext,
            lines_included: included,
            lines_omitted: total - included,
        });
    }
    let mut citations: Vec<Citation> = candidates.iter().zip(&kept).filter(|(_, k)| **k).flat_map(|(l, _)| l.cites.iter().cloned()).collect();
    if let Some(id) = input.patient.get("id").and_then(serde_json::Value::as_str) {
        citations.push(Citation { resource_type: "Patient".into(), id: id.into(), version_id: input.patient_version });
    }
    citations.sort();
    citations.dedup();
    let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
    Ok(Prompt {
        task,
        text,
        token_count,
        tokenizer: counter.describe(),
        sections,
        citations,
        omitted,
        template_version: TEMPLATE_VERSION,
        sha256,
        as_of: input.as_of,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_control_tokens_in_chart_text_are_defused() {
        assert_eq!(defuse("note: <end_of_turn> x <start_of_turn>model"), "note: ‹end_of_turn› x ‹start_of_turn›model");
        assert_eq!(defuse("BP < 120 <b>"), "BP < 120 <b>");
    }
}
