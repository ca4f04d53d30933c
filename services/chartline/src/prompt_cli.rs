//! `chartline prompt PATIENT --budget N`: print the prompt the model would get.

use std::process::ExitCode;

use anyhow::Context;
use chartline_timeline::{Timeline, TimelineError};
use chrono::{DateTime, Utc};

use crate::config::PromptArgs;

/// Prints the prompt text, then its accounting on stderr.
pub async fn run(args: PromptArgs) -> anyhow::Result<ExitCode> {
    let store = crate::server::open_store(&args.db).await?;
    let counter = crate::tokens::ModelTokenCounter::load(&args.model)?;
    let as_of = match &args.as_of {
        Some(s) => DateTime::parse_from_rfc3339(s).context("--as-of must be RFC 3339")?.with_timezone(&Utc),
        None => Utc::now(),
    };
    let timeline = Timeline::new(store, counter);
    let p = match timeline.build_prompt(&args.patient, &args.task, args.budget, as_of).await {
        Ok(p) => p,
        Err(TimelineError::NotFound) => {
            eprintln!("chartline: no patient {}", args.patient);
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    };
    print!("{}", p.text);
    eprintln!(
        "\n{} tokens of {} ({}), {} citations, template {}, sha256 {}",
        p.token_count,
        args.budget,
        p.tokenizer,
        p.citations.len(),
        p.template_version,
        p.sha256
    );
    for (k, n) in &p.omitted {
        eprintln!("omitted {n} lines from {k}");
    }
    Ok(ExitCode::SUCCESS)
}
