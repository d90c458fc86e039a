//! Running a study: the base policy, the reward model, then every cell of the matrix, each
//! written atomically under `reports/<study>/` with its identity (`identity`), so that a rerun
//! skips what is done with the same settings and refuses to mix in what was done with others. The charts and
//! `report.md` come after, from what was written (`compare`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use policy_models::PolicyTokenizer;
use tasks::TaskData;

use crate::common::{remove_partial, write_atomically};
use crate::study::base::prepare_base;
use crate::study::cell::run_cell;
use crate::study::checkpoint::{self, Interrupted};
use crate::study::config::{Cell, PolicyBase, RewardModelSpec, Study, TaskSpec};
use crate::study::identity::{Check, Identity, base_config, cell_config, check, reward_model_config};
use crate::study::progress::Progress;
use crate::study::report::{CellSummary, failed_summary, write_reports};
use crate::study::reward_model::prepare_reward_model;

/// How `compare` runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where `reports/` is.
    pub reports: PathBuf,
    /// Redo what was made with other settings (the base, the reward model, cells with their
    /// checkpoints) instead of refusing to run; what matches is kept, and an interrupted cell
    /// with matching settings resumes.
    pub force: bool,
    /// Plain log lines instead of progress bars.
    pub quiet: bool,
}

/// Runs every unfinished cell of `study`.
pub fn run_study(study: &Study, options: &RunOptions) -> anyhow::Result<Vec<CellSummary>> {
    let dir = options.reports.join(&study.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let progress = Progress::new(options.quiet);
    let matrix = study.matrix();
    let cell_identities = check_artefacts(study, &dir, &matrix, options, &progress)?;
    // Only now: every artefact kept was produced with these settings.
    write_atomically(&dir.join("config.json"), serde_json::to_string_pretty(study)?.as_bytes())?;
    let device = study.backend.device()?;
    let task = load_task(study)?;
    let base_dir = prepare_base(study, &task, &dir, &device, &progress)?;
    let tokenizer = PolicyTokenizer::load_dir(&base_dir)
        .with_context(|| format!("the base policy in {} has no tokenizer", base_dir.display()))?;
    let reward_model = prepare_reward_model(study, &task, &dir, &base_dir, &device, &progress)?;
    // Before any cell: a study stopped early still says what it read.
    crate::study::provenance::write(&dir, study, &base_dir)?;
    let mut overall = progress.bar(matrix.len() as u64, "cells", 0);
    let mut summaries = Vec::new();
    for (cell, identity) in matrix.iter().zip(&cell_identities) {
        let cell_dir = dir.join("cells").join(cell.id());
        let summary_path = cell_dir.join("summary.json");
        // Finished and diverged cells are skipped on a rerun (the same settings diverge again);
        // failed ones are tried again. What is here was made with these settings
        // (`check_artefacts`).
        let earlier = std::fs::read_to_string(&summary_path)
            .ok()
            .and_then(|text| serde_json::from_str::<CellSummary>(&text).ok());
        if let Some(summary) = earlier.filter(|s| s.is_result() || s.is_diverged()) {
            let what = if summary.is_diverged() { "diverged earlier" } else { "done earlier" };
            progress.log(format!("{}: {what}, skipped", cell.id()));
            summaries.push(summary);
            overall.inc(1);
            continue;
        }
        overall.set_message(cell.id());
        std::fs::create_dir_all(&cell_dir)?;
        // First, so whatever the cell leaves behind is known by its settings.
        identity.write(&cell_dir)?;
        let started = Instant::now();
        // A failing cell (an error, or a panic deep in a backend) is recorded and the others go on.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_cell(study, cell, &task, &base_dir, &tokenizer, reward_model.as_ref(), &cell_dir, &device, &progress)
        }));
        let summary = match outcome {
            Ok(Ok(summary)) => summary,
            // Ctrl-C: the cell wrote a checkpoint and no result; the study stops here.
            Ok(Err(error)) if error.is::<Interrupted>() => {
                drop(overall);
                return Err(error);
            }
            Ok(Err(error)) => {
                progress.log(format!("{}: failed: {error:#}", cell.id()));
                failed_summary(cell, format!("{error:#}"))
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                progress.log(format!("{}: failed (panic): {message}", cell.id()));
                failed_summary(cell, format!("panic: {message}"))
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let line = match (summary.accuracy_strict, summary.accuracy_lenient) {
            (Some(strict), Some(lenient)) if summary.is_result() => {
                format!("{}: strict {:.1}% lenient {:.1}% ({seconds:.0} s)", cell.id(), strict * 100.0, lenient * 100.0)
            }
            _ if summary.is_diverged() => format!(
                "{}: diverged, not a result: {} ({seconds:.0} s)",
                cell.id(),
                summary.error.as_deref().unwrap_or("")
            ),
            _ => format!("{}: failed ({seconds:.0} s)", cell.id()),
        };
        progress.log(line);
        write_atomically(&summary_path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        // A finished or diverged cell is not run again; a failed one resumes from its checkpoint.
        if summary.is_result() || summary.is_diverged() {
            checkpoint::remove(&cell_dir)?;
        }
        summaries.push(summary);
        overall.inc(1);
    }
    drop(overall);
    write_reports(&dir, &summaries)?;
    Ok(summaries)
}

/// Checks every artefact already under `dir` (the base, the reward model, each cell of `matrix`)
/// against the study's settings for it, after removing what an interrupted run left half
/// written. An artefact made with other settings is an error that lists what changed; with
/// `options.force` it is removed instead (a cell's whole directory, its checkpoints included),
/// to be redone. Returns each cell's identity, in `matrix`'s order.
pub(crate) fn check_artefacts(
    study: &Study,
    dir: &Path,
    matrix: &[Cell],
    options: &RunOptions,
    progress: &Progress,
) -> anyhow::Result<Vec<Identity>> {
    let mut artefacts: Vec<(String, PathBuf, Identity)> = Vec::new();
    if let PolicyBase::Preset { .. } = study.policy.base {
        artefacts.push(("base policy".to_string(), dir.join("base"), Identity::new(base_config(study)?)));
    }
    let trained_here = matches!(
        study.reward_model,
        Some(
            RewardModelSpec::Train { .. }
                | RewardModelSpec::CausalLm { .. }
                | RewardModelSpec::Checkpoint { fine_tune: Some(_), .. }
        )
    );
    if let (true, Some(config)) = (trained_here, reward_model_config(study)?) {
        artefacts.push(("reward model".to_string(), dir.join("reward_model"), Identity::new(config)));
    }
    for (what, artefact, _) in &artefacts {
        if let Some(partial) = remove_partial(artefact)? {
            progress.log(format!("removed an incomplete {what} from an interrupted run: {}", partial.display()));
        }
    }
    let mut cells = Vec::new();
    for cell in matrix {
        let identity = Identity::new(cell_config(study, cell)?);
        artefacts.push((format!("cell {}", cell.id()), dir.join("cells").join(cell.id()), identity.clone()));
        cells.push(identity);
    }
    let mut changed: Vec<(String, PathBuf, Vec<String>)> = Vec::new();
    for (what, artefact, identity) in artefacts {
        if let Check::Differs(lines) = check(&artefact, &identity)? {
            changed.push((what, artefact, lines));
        }
    }
    if changed.is_empty() {
        return Ok(cells);
    }
    if !options.force {
        // Artefacts that differ alike (every cell, after a change to the base) are listed once.
        let mut groups: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        for (what, artefact, lines) in &changed {
            let named = format!("{what} ({})", artefact.display());
            match groups.iter_mut().find(|(known, _)| known == lines) {
                Some((_, names)) => names.push(named),
                None => groups.push((lines.clone(), vec![named])),
            }
        }
        let mut message = format!(
            "{} holds results of other settings than this study's; reusing them would report them under the new settings:\n",
            dir.display()
        );
        for (lines, names) in groups {
            message.push_str(&format!("  {}:\n", names.join(", ")));
            for line in lines {
                message.push_str(&format!("    {line}\n"));
            }
        }
        message.push_str("Rerun with --force to redo these (what still matches is kept), or give the study a new name to keep the old results apart.");
        bail!(message);
    }
    for (what, artefact, lines) in &changed {
        progress.log(format!("{what}: made with other settings ({}), redone (--force)", lines.join("; ")));
        std::fs::remove_dir_all(artefact)
            .with_context(|| format!("cannot remove {} to redo it", artefact.display()))?;
    }
    Ok(cells)
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
