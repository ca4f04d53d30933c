//! The citation check: every `[Type/id]` the model writes must be one the prompt cited.
//! Statements without a citation, or with one the prompt did not carry, are kept but
//! marked unsupported.

use std::collections::BTreeSet;

use serde::Serialize;

/// One statement of the narrative and how its citations check out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Statement {
    /// The statement text.
    pub text: String,
    /// Tags found (`Type/id`).
    pub citations: Vec<String>,
    /// Tags found that the prompt did not cite.
    pub unverified: Vec<String>,
    /// At least one citation, and all of them from the prompt.
    pub supported: bool,
}

/// The whole check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CitationReport {
    /// Statements in order.
    pub statements: Vec<Statement>,
    /// Tags found in the narrative (with repeats).
    pub found: usize,
    /// Of those, tags the prompt cited.
    pub verified: usize,
    /// Statements not supported.
    pub unsupported: usize,
}

/// `[Type/id]` tags in a text, in order. A tag is a FHIR resource type name (capitalised
/// letters) and a FHIR id.
pub fn tags(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find('[') {
        rest = &rest[i + 1..];
        let Some(j) = rest.find(']') else { break };
        let inner = &rest[..j];
        if let Some((ty, id)) = inner.split_once('/') {
            let type_ok = ty.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && ty.chars().all(|c| c.is_ascii_alphabetic());
            let id_ok = !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if type_ok && id_ok {
                out.push(inner.to_owned());
            }
        }
        rest = &rest[j..];
    }
    out
}

/// Splits a narrative into statements: lines, and sentences within lines. Citation tags
/// that follow a sentence's full stop belong to that sentence.
pub fn statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim().trim_start_matches(['-', '*', '•']).trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut current = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            current.push(chars[i]);
            let end = matches!(chars[i], '.' | '!' | '?') && chars.get(i + 1).is_none_or(|c| c.is_whitespace());
            if end {
                // Swallow tags written after the stop: "... disease. [Condition/1]"
                let mut k = i + 1;
                loop {
                    while k < chars.len() && chars[k] == ' ' {
                        k += 1;
                    }
                    if k < chars.len() && chars[k] == '[' {
                        if let Some(close) = chars[k..].iter().position(|&c| c == ']') {
                            current.push(' ');
                            current.extend(&chars[k..=k + close]);
                            k += close + 1;
                            continue;
                        }
                    }
                    break;
                }
                i = k;
                let s = current.trim().to_owned();
                if s.chars().any(char::is_alphanumeric) {
                    out.push(s);
                }
                current.clear();
                continue;
            }
            i += 1;
        }
        let s = current.trim().to_owned();
        if s.chars().any(char::is_alphanumeric) {
            out.push(s);
        }
    }
    out
}

/// Checks a narrative against the set of tags (`Type/id`) the prompt cited.
pub fn check(narrative: &str, cited: &BTreeSet<String>) -> CitationReport {
    let mut found = 0;
    let mut verified = 0;
    let mut unsupported = 0;
    let statements: Vec<Statement> = statements(narrative)
        .into_iter()
        .map(|text| {
            let citations = tags(&text);
            let unverified: Vec<String> = citations.iter().filter(|t| !cited.contains(*t)).cloned().collect();
            found += citations.len();
            verified += citations.len() - unverified.len();
            let supported = !citations.is_empty() && unverified.is_empty();
            if !supported {
                unsupported += 1;
            }
            Statement { text, citations, unverified, supported }
        })
        .collect();
    CitationReport { statements, found, verified, unsupported }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cited(tags: &[&str]) -> BTreeSet<String> {
        tags.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn supported_unsupported_and_foreign_citations_are_told_apart() {
        let text = "He has chronic kidney disease [Condition/ckd-1]. His HbA1c rose to 8.2%. [Observation/a1c]\n\
                    - Takes metformin [MedicationRequest/m9].\nHe smokes.";
        let r = check(text, &cited(&["Condition/ckd-1", "Observation/a1c"]));
        assert_eq!(r.statements.len(), 4);
        assert!(r.statements[0].supported);
        assert!(r.statements[1].supported, "a tag after the full stop belongs to the sentence");
        assert!(!r.statements[2].supported && r.statements[2].unverified == ["MedicationRequest/m9"], "not in the prompt");
        assert!(!r.statements[3].supported && r.statements[3].citations.is_empty(), "no citation");
        assert_eq!((r.found, r.verified, r.unsupported), (3, 2, 2));
    }

    #[test]
    fn units_and_prose_in_brackets_are_not_citations() {
        assert!(tags("glucose [mg/dL] and [see above]").is_empty());
        assert_eq!(tags("x [Patient/p-1.2] y"), ["Patient/p-1.2"]);
    }

    #[test]
    fn decimals_do_not_split_statements() {
        assert_eq!(statements("HbA1c 7.5 % rising. Stable."), ["HbA1c 7.5 % rising.", "Stable."]);
    }
}
