//! `cargo xtask score <predictions.jsonl> [--json]`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use anyhow::{Context, bail};
use eval::{AccuracySummary, AnswerFormat, parse_gold, score_completion};
use serde::Deserialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// JSONL file, one `{"completion": ..., "answer": ...}` per line; `answer` is a GSM8K gold
    /// solution ending in `#### N`, or a bare number.
    predictions: PathBuf,
    /// Print JSON (`{"strict": {...}, "lenient": {...}}`) instead of a table.
    #[arg(long)]
    json: bool,
    /// The answer format that strict scoring reads.
    #[arg(long, value_enum, default_value_t = Format::Gsm8k)]
    format: Format,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    /// GSM8K's `#### N`, read by the official scorer's regular expression.
    Gsm8k,
    /// `<answer>N</answer>`.
    AnswerTag,
}

impl From<Format> for AnswerFormat {
    fn from(format: Format) -> Self {
        match format {
            Format::Gsm8k => AnswerFormat::Gsm8kMarker,
            Format::AnswerTag => AnswerFormat::AnswerTag,
        }
    }
}

#[derive(Deserialize)]
struct Prediction {
    completion: String,
    answer: serde_json::Value,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = &args.predictions;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut scores = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line_number = index + 1;
        let line = line.with_context(|| format!("{}:{line_number}: cannot read", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let prediction: Prediction = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{line_number}: expected a JSON object with fields \"completion\" (a string) and \"answer\"",
                path.display()
            )
        })?;
        let gold_text = match &prediction.answer {
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Number(number) => number.to_string(),
            other => {
                bail!("{}:{line_number}: \"answer\" should be a string or a number, found {other}", path.display())
            }
        };
        let Some(gold) = parse_gold(&gold_text) else {
            bail!(
                "{}:{line_number}: the gold answer {gold_text:?} is neither a number nor a solution ending in `#### N`",
                path.display()
            );
        };
        scores.push(score_completion(&prediction.completion, &gold, args.format.into()));
    }
    if scores.is_empty() {
        bail!("{}: no predictions in the file", path.display());
    }
    let summary = AccuracySummary::from_scores(&scores);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}: {} completions", path.display(), scores.len());
        println!("{:<8}  {:>8}  {:>18}  {:>6}", "", "accuracy", "95% CI (Wilson)", "n");
        for (name, accuracy) in [("strict", summary.strict), ("lenient", summary.lenient)] {
            println!(
                "{name:<8}  {:>7.2}%  [{:>6.2}%, {:>6.2}%]  {:>6}",
                accuracy.accuracy * 100.0,
                accuracy.ci_low * 100.0,
                accuracy.ci_high * 100.0,
                accuracy.n
            );
        }
    }
    Ok(())
}
