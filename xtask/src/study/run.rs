//! Running a study: the base policy, the reward model, then every cell of the matrix, each
//! written atomically under `reports/<study>/` so that a rerun skips what is done. The charts and
//! `report.md` come after, from what was written (`compare`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use policy_models::PolicyTokenizer;
use tasks::TaskData;

use crate::common::write_atomically;
use crate::study::base::prepare_base;
use crate::study::cell::run_cell;
use crate::study::checkpoint::{self, Interrupted};
use crate::study::config::{Study, TaskSpec};
use crate::study::progress::log;
use crate::study::report::{CellSummary, failed_summary, write_reports};
use crate::study::reward_model::prepare_reward_model;

/// How `compare` runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where `reports/` is.
    pub reports: PathBuf,
    /// Redo finished cells, and start interrupted ones over (their checkpoints are deleted).
    pub force: bool,
    /// Plain log lines instead of progress bars.
    pub quiet: bool,
}

/// Runs every unfinished cell of `study`.
pub fn run_study(study: &Study, options: &RunOptions) -> anyhow::Result<Vec<CellSummary>> {
    let dir = options.reports.join(&study.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomically(&dir.join("config.json"), serde_json::to_string_pretty(study)?.as_bytes())?;
    let progress = if options.quiet { MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden()) } else { MultiProgress::new() };
    let device = study.backend.device()?;
    let task = load_task(study)?;
    let base_dir = prepare_base(study, &task, &dir, &device, options, &progress)?;
    let tokenizer = PolicyTokenizer::load_dir(&base_dir).with_context(|| format!("the base policy in {} has no tokenizer", base_dir.display()))?;
    let reward_model = prepare_reward_model(study, &task, &dir, &base_dir, &device, options, &progress)?;
    let matrix = study.matrix();
    let overall = progress.add(ProgressBar::new(matrix.len() as u64));
    overall.set_style(ProgressStyle::with_template("cells {bar:30} {pos}/{len} eta {eta} {msg}")?);
    let mut summaries = Vec::new();
    for cell in &matrix {
        let cell_dir = dir.join("cells").join(cell.id());
        let summary_path = cell_dir.join("summary.json");
        // Finished and diverged cells are skipped on a rerun (the same settings diverge again);
        // failed ones are tried again.
        let earlier = std::fs::read_to_string(&summary_path).ok().and_then(|text| serde_json::from_str::<CellSummary>(&text).ok());
        if let (Some(summary), false) = (earlier.filter(|s| s.is_result() || s.is_diverged()), options.force) {
            let what = if summary.is_diverged() { "diverged earlier" } else { "done earlier" };
            log(options.quiet, &progress, format!("{}: {what}, skipped", cell.id()));
            summaries.push(summary);
            overall.inc(1);
            continue;
        }
        overall.set_message(cell.id());
        std::fs::create_dir_all(&cell_dir)?;
        if options.force {
            checkpoint::remove(&cell_dir)?;
        }
        let started = Instant::now();
        // A failing cell (an error, or a panic deep in a backend) is recorded and the others go on.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_cell(study, cell, &task, &base_dir, &tokenizer, reward_model.as_ref(), &cell_dir, &device, &progress, options.quiet)
        }));
        let summary = match outcome {
            Ok(Ok(summary)) => summary,
            // Ctrl-C: the cell wrote a checkpoint and no result; the study stops here.
            Ok(Err(error)) if error.is::<Interrupted>() => {
                overall.finish_and_clear();
                return Err(error);
            }
            Ok(Err(error)) => {
                log(options.quiet, &progress, format!("{}: failed: {error:#}", cell.id()));
                failed_summary(cell, format!("{error:#}"))
            }
            Err(panic) => {
                let message = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                log(options.quiet, &progress, format!("{}: failed (panic): {message}", cell.id()));
                failed_summary(cell, format!("panic: {message}"))
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let line = match (summary.accuracy_strict, summary.accuracy_lenient) {
            (Some(strict), Some(lenient)) if summary.is_result() => format!("{}: strict {:.1}% lenient {:.1}% ({seconds:.0} s)", cell.id(), strict * 100.0, lenient * 100.0),
            _ if summary.is_diverged() => format!("{}: diverged, not a result: {} ({seconds:.0} s)", cell.id(), summary.error.as_deref().unwrap_or("")),
            _ => format!("{}: failed ({seconds:.0} s)", cell.id()),
        };
        log(options.quiet, &progress, line);
        write_atomically(&summary_path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        // A finished or diverged cell is not run again; a failed one resumes from its checkpoint.
        if summary.is_result() || summary.is_diverged() {
            checkpoint::remove(&cell_dir)?;
        }
        summaries.push(summary);
        overall.inc(1);
    }
    overall.finish_and_clear();
    write_reports(&dir, &summaries)?;
    Ok(summaries)
}

pub(crate) fn load_task(study: &Study) -> anyhow::Result<TaskData> {
    Ok(match &study.task {
        TaskSpec::Synthetic { synthetic } => tasks::synthetic::generate(synthetic)?,
        TaskSpec::Gsm8k { source, options, train_limit } => {
            let mut data = tasks::gsm8k::load(source, *options)?;
            if let Some(limit) = train_limit {
                data.train.problems.truncate(*limit);
            }
            data
        }
    })
}
