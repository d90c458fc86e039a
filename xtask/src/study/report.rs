//! What a study writes about its cells: each cell's summary (`cells/<id>/summary.json`), its
//! per-step `metrics.csv`, and the study's `summary.csv`, `summary.json`, `metrics.csv` and
//! `report.md`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::common::write_atomically;
use crate::study::cell::DIVERGENCE_UPDATE_RATIO;
use crate::study::config::Cell;
use crate::study::reward_model::RewardModelReport;

/// What became of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellStatus {
    /// Trained (if it trains) and evaluated: a result.
    #[default]
    Finished,
    /// Stopped by an error (its message in `error`); rerun `compare` to retry it.
    Failed,
    /// Its training diverged (see [`divergence`]; the step and the quantity in `error`): not a
    /// result, left out of the means, the intervals and the charts. A rerun does not retry it
    /// (the same settings diverge again): changed settings, or deleting `cells/<id>/`, do.
    Diverged,
}

/// One cell's results (`cells/<id>/summary.json`, and a row of `summary.csv`).
///
/// The accuracies are absent (not NaN, which JSON writes as `null`) for a cell that failed or
/// diverged: readers such as `cargo xtask plot` then parse every cell and skip those.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellSummary {
    /// Method name.
    pub method: String,
    /// Reward source (`-` for none).
    pub reward_source: String,
    /// Seed.
    pub seed: u64,
    /// Strict accuracy with its 95% Wilson interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_strict: Option<f64>,
    /// Lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_strict_ci_low: Option<f64>,
    /// Upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_strict_ci_high: Option<f64>,
    /// Lenient accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_lenient: Option<f64>,
    /// Lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_lenient_ci_low: Option<f64>,
    /// Upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_lenient_ci_high: Option<f64>,
    /// Held-out problems evaluated.
    pub test_problems: usize,
    /// Training seconds (0 for methods that do not train).
    pub train_seconds: f64,
    /// Steps to convergence of the reward curve (none for methods that do not train).
    pub steps_to_convergence: Option<u64>,
    /// Variance of `update_norm` over steps.
    pub update_norm_variance: Option<f64>,
    /// Mean of `update_norm` over steps.
    #[serde(default)]
    pub update_norm_mean: Option<f64>,
    /// Mean of the training reward over the last quarter of the steps.
    #[serde(default)]
    pub final_reward: Option<f64>,
    /// maj@k accuracy (lenient answers, majority of k samples), when `evaluation.maj_k > 0`.
    #[serde(default)]
    pub accuracy_maj: Option<f64>,
    /// Why the cell failed or diverged.
    pub error: Option<String>,
    /// Finished, failed or diverged (summaries written before this field: finished, or failed
    /// when they carry an error).
    #[serde(default)]
    pub status: CellStatus,
}

impl CellSummary {
    /// The cell's id (`cells/<id>/`).
    pub fn id(&self) -> String {
        Cell { method: self.method.clone(), reward_source: self.reward_source.clone(), seed: self.seed }.id()
    }

    /// A result: finished, with its accuracies. Only these enter means, intervals and charts.
    pub fn is_result(&self) -> bool {
        self.status == CellStatus::Finished
            && self.error.is_none()
            && self.accuracy_strict.is_some()
            && self.accuracy_lenient.is_some()
    }

    /// Failed: an error stopped it (a summary from before `status` was written says so by its error).
    pub fn is_failed(&self) -> bool {
        self.status == CellStatus::Failed || (self.status == CellStatus::Finished && !self.is_result())
    }

    /// Its training diverged.
    pub fn is_diverged(&self) -> bool {
        self.status == CellStatus::Diverged
    }
}

/// A row of `summary.csv`: [`CellSummary`]'s fields in its order, every one present (an absent
/// value is an empty field). The csv crate cannot skip a field, as summary.json does, without
/// misaligning the columns.
#[derive(Serialize)]
pub(crate) struct SummaryCsvRow<'a> {
    method: &'a str,
    reward_source: &'a str,
    seed: u64,
    accuracy_strict: Option<f64>,
    accuracy_strict_ci_low: Option<f64>,
    accuracy_strict_ci_high: Option<f64>,
    accuracy_lenient: Option<f64>,
    accuracy_lenient_ci_low: Option<f64>,
    accuracy_lenient_ci_high: Option<f64>,
    test_problems: usize,
    train_seconds: f64,
    steps_to_convergence: Option<u64>,
    update_norm_variance: Option<f64>,
    update_norm_mean: Option<f64>,
    final_reward: Option<f64>,
    accuracy_maj: Option<f64>,
    error: Option<&'a str>,
    status: CellStatus,
}

impl<'a> From<&'a CellSummary> for SummaryCsvRow<'a> {
    fn from(s: &'a CellSummary) -> Self {
        Self {
            method: &s.method,
            reward_source: &s.reward_source,
            seed: s.seed,
            accuracy_strict: s.accuracy_strict,
            accuracy_strict_ci_low: s.accuracy_strict_ci_low,
            accuracy_strict_ci_high: s.accuracy_strict_ci_high,
            accuracy_lenient: s.accuracy_lenient,
            accuracy_lenient_ci_low: s.accuracy_lenient_ci_low,
            accuracy_lenient_ci_high: s.accuracy_lenient_ci_high,
            test_problems: s.test_problems,
            train_seconds: s.train_seconds,
            steps_to_convergence: s.steps_to_convergence,
            update_norm_variance: s.update_norm_variance,
            update_norm_mean: s.update_norm_mean,
            final_reward: s.final_reward,
            accuracy_maj: s.accuracy_maj,
            error: s.error.as_deref(),
            status: s.status,
        }
    }
}

/// The summary of a cell that is no result: no accuracies (absent, not NaN), the reason in `error`.
pub(crate) fn unfinished_summary(cell: &Cell, status: CellStatus, error: String, train_seconds: f64) -> CellSummary {
    CellSummary {
        method: cell.method.clone(),
        reward_source: cell.reward_source.clone(),
        seed: cell.seed,
        accuracy_strict: None,
        accuracy_strict_ci_low: None,
        accuracy_strict_ci_high: None,
        accuracy_lenient: None,
        accuracy_lenient_ci_low: None,
        accuracy_lenient_ci_high: None,
        test_problems: 0,
        train_seconds,
        steps_to_convergence: None,
        update_norm_variance: None,
        update_norm_mean: None,
        final_reward: None,
        accuracy_maj: None,
        error: Some(error),
        status,
    }
}

pub(crate) fn failed_summary(cell: &Cell, error: String) -> CellSummary {
    unfinished_summary(cell, CellStatus::Failed, error, 0.0)
}

/// `cells/<id>/metrics.csv`, one row per step, written as the steps come: a row is appended and
/// flushed at once, so a cell that diverges or crashes keeps the rows before. The columns (the
/// algorithm's metric names, sorted) are known only as rows arrive: a row with a new column
/// rewrites the file (atomically) under the wider header, which happens at the first steps only.
/// The finished file is the same as one written at the end.
pub(crate) struct MetricsFile {
    path: PathBuf,
    cell: Cell,
    columns: std::collections::BTreeSet<String>,
    rows: Vec<rl_algos::Metrics>,
}

impl MetricsFile {
    /// Starts the file with the fixed columns only (what a method that does not train keeps).
    pub(crate) fn create(cell: &Cell, cell_dir: &Path) -> anyhow::Result<Self> {
        let file = Self {
            path: cell_dir.join("metrics.csv"),
            cell: cell.clone(),
            columns: Default::default(),
            rows: Vec::new(),
        };
        file.rewrite()?;
        Ok(file)
    }

    /// The file of a resumed cell: `rows` (those of its checkpoint) and nothing after them,
    /// dropping rows of steps written after the checkpoint by the run that stopped.
    pub(crate) fn restore(cell: &Cell, cell_dir: &Path, rows: Vec<rl_algos::Metrics>) -> anyhow::Result<Self> {
        let columns = rows.iter().flat_map(|row| row.keys().filter(|key| *key != "step").cloned()).collect();
        let file = Self { path: cell_dir.join("metrics.csv"), cell: cell.clone(), columns, rows };
        file.rewrite()?;
        Ok(file)
    }

    fn header(&self) -> Vec<String> {
        ["method", "reward_source", "seed", "step"]
            .iter()
            .map(|s| s.to_string())
            .chain(self.columns.iter().cloned())
            .collect()
    }

    fn record(&self, index: usize, row: &rl_algos::Metrics) -> Vec<String> {
        // Rows name their step (0: the evaluation before training); otherwise they count from 1.
        let step = row.get("step").map_or(index as u64 + 1, |step| *step as u64);
        let mut record = vec![
            self.cell.method.clone(),
            self.cell.reward_source.clone(),
            self.cell.seed.to_string(),
            step.to_string(),
        ];
        record.extend(self.columns.iter().map(|column| row.get(column).map_or(String::new(), |v| v.to_string())));
        record
    }

    fn rewrite(&self) -> anyhow::Result<()> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.write_record(self.header())?;
        for (index, row) in self.rows.iter().enumerate() {
            writer.write_record(self.record(index, row))?;
        }
        write_atomically(&self.path, &writer.into_inner()?)
    }

    pub(crate) fn push(&mut self, row: &rl_algos::Metrics) -> anyhow::Result<()> {
        let before = self.columns.len();
        self.columns.extend(row.keys().filter(|key| *key != "step").cloned());
        self.rows.push(row.clone());
        if self.columns.len() != before {
            return self.rewrite();
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        let mut writer = csv::Writer::from_writer(file);
        writer.write_record(self.record(self.rows.len() - 1, row))?;
        writer.flush().with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(())
    }
}

/// `summary.csv`, `summary.json` and `metrics.csv` over all cells (`report.md` comes after the
/// charts, which it shows: [`write_report_markdown`]).
pub(crate) fn write_reports(dir: &Path, summaries: &[CellSummary]) -> anyhow::Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for summary in summaries {
        writer.serialize(SummaryCsvRow::from(summary))?;
    }
    write_atomically(&dir.join("summary.csv"), &writer.into_inner()?)?;
    write_combined_metrics(dir, summaries)?;
    write_atomically(&dir.join("summary.json"), serde_json::to_string_pretty(summaries)?.as_bytes())
}

/// `report.md` (see [`report_markdown`]).
pub fn write_report_markdown(dir: &Path, summaries: &[CellSummary]) -> anyhow::Result<()> {
    write_atomically(&dir.join("report.md"), report_markdown(dir, summaries).as_bytes())
}

/// The study's `metrics.csv`: every finished cell's rows (one per training step) in one file,
/// under the union of the cells' columns (a column a cell does not report is empty in its rows).
/// Failed and diverged cells keep their rows in their own `cells/<id>/metrics.csv` only.
pub(crate) fn write_combined_metrics(dir: &Path, summaries: &[CellSummary]) -> anyhow::Result<()> {
    let fixed = ["method", "reward_source", "seed", "step"];
    let mut columns: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut tables = Vec::new();
    for summary in summaries.iter().filter(|s| s.is_result()) {
        let path = dir.join("cells").join(summary.id()).join("metrics.csv");
        if !path.is_file() {
            continue;
        }
        let mut reader = csv::Reader::from_path(&path).with_context(|| format!("reading {}", path.display()))?;
        let header: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
        let rows: Vec<csv::StringRecord> =
            reader.records().collect::<Result<_, _>>().with_context(|| format!("reading {}", path.display()))?;
        columns.extend(header.iter().filter(|name| !fixed.contains(&name.as_str())).cloned());
        tables.push((header, rows));
    }
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(fixed.iter().map(|name| name.to_string()).chain(columns.iter().cloned()))?;
    for (header, rows) in &tables {
        for row in rows {
            let value =
                |name: &str| header.iter().position(|h| h == name).and_then(|i| row.get(i)).unwrap_or("").to_string();
            writer.write_record(fixed.iter().map(|name| value(name)).chain(columns.iter().map(|name| value(name))))?;
        }
    }
    write_atomically(&dir.join("metrics.csv"), &writer.into_inner()?)
}

/// `report.md`: per (method, reward source), the mean over seeds with its 95% interval (the
/// wider of the across-seed t interval and the test-set Wilson interval, as the charts draw),
/// training cost and stability, then the reward model, the charts and the cells that are no
/// result (diverged, failed), which count in neither the means nor the intervals.
pub fn report_markdown(dir: &Path, summaries: &[CellSummary]) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let mut report = format!("# Study `{name}`\n\n");
    report.push_str("Accuracy on held-out problems (greedy decoding): mean over seeds, 95% CI in brackets (the wider of the across-seed Student-t interval and the test-set Wilson interval). Strict reads only the template's official answer format; lenient takes the last number.\n\n");
    report.push_str("| method | reward source | seeds | lenient accuracy | strict accuracy | maj@k | final reward | train s | steps to convergence | update_norm mean (var) |\n|---|---|---|---|---|---|---|---|---|---|\n");
    let mut groups: Vec<(String, String)> = Vec::new();
    for summary in summaries {
        let key = (summary.method.clone(), summary.reward_source.clone());
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    let fmt_opt = |values: Vec<f64>, digits: usize| {
        if values.is_empty() { "-".to_string() } else { format!("{:.*}", digits, eval::stats::mean_std(&values).mean) }
    };
    for (method, source) in &groups {
        let group: Vec<&CellSummary> =
            summaries.iter().filter(|s| &s.method == method && &s.reward_source == source).collect();
        let cells: Vec<&CellSummary> = group.iter().copied().filter(|s| s.is_result()).collect();
        if cells.is_empty() {
            let outcome = if group.iter().any(|s| s.is_diverged()) { "diverged" } else { "failed" };
            report.push_str(&format!("| {method} | {source} | 0 | {outcome} | {outcome} | - | - | - | - | - |\n"));
            continue;
        }
        let interval = |mean: fn(&CellSummary) -> Option<f64>,
                        low: fn(&CellSummary) -> Option<f64>,
                        high: fn(&CellSummary) -> Option<f64>| {
            let take = |f: fn(&CellSummary) -> Option<f64>| cells.iter().filter_map(|c| f(c)).collect::<Vec<f64>>();
            let (m, l, h) = eval::stats::accuracy_interval(&take(mean), &take(low), &take(high));
            format!("{:.1}% [{:.1}, {:.1}]", 100.0 * m, 100.0 * l, 100.0 * h)
        };
        let lenient = interval(|c| c.accuracy_lenient, |c| c.accuracy_lenient_ci_low, |c| c.accuracy_lenient_ci_high);
        let strict = interval(|c| c.accuracy_strict, |c| c.accuracy_strict_ci_low, |c| c.accuracy_strict_ci_high);
        let maj: Vec<f64> = cells.iter().filter_map(|c| c.accuracy_maj.map(|v| 100.0 * v)).collect();
        let maj = if maj.is_empty() { "-".to_string() } else { format!("{:.1}%", eval::stats::mean_std(&maj).mean) };
        let mut convergence: Vec<u64> = cells.iter().filter_map(|c| c.steps_to_convergence).collect();
        convergence.sort_unstable();
        let convergence = convergence.get(convergence.len() / 2).map_or("-".to_string(), |v| format!("{v} (median)"));
        let norms = fmt_opt(cells.iter().filter_map(|c| c.update_norm_mean).collect(), 4);
        let norm_var = fmt_opt(cells.iter().filter_map(|c| c.update_norm_variance).collect(), 6);
        report.push_str(&format!(
            "| {method} | {source} | {} | {lenient} | {strict} | {maj} | {} | {} | {convergence} | {} |\n",
            cells.len(),
            fmt_opt(cells.iter().filter_map(|c| c.final_reward).collect(), 3),
            fmt_opt(cells.iter().map(|c| c.train_seconds).filter(|s| *s > 0.0).collect(), 0),
            if norms == "-" { norms } else { format!("{norms} ({norm_var})") },
        ));
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("reward_model/metrics.json"))
        && let Ok(rm) = serde_json::from_str::<RewardModelReport>(&text)
    {
        report.push_str(&format!(
            "\nReward model: held-out pairwise accuracy {:.1}% over {} pairs from the test split ({}), mean margin {:.3}, {} steps in {:.0} s.\n",
            100.0 * rm.held_out_accuracy,
            rm.held_out_pairs,
            rm.held_out_accuracy_by_corruption.iter().map(|(kind, accuracy)| format!("{kind} {:.1}%", accuracy * 100.0)).collect::<Vec<_>>().join(", "),
            rm.held_out_mean_margin,
            rm.steps,
            rm.train_seconds
        ));
        if !rm.held_out_accuracy_at_start_by_corruption.is_empty() {
            report.push_str(&format!(
                "Before training: {}.\n",
                rm.held_out_accuracy_at_start_by_corruption
                    .iter()
                    .map(|(kind, accuracy)| format!("{kind} {:.1}%", accuracy * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let charts = [
        ("accuracy", "Accuracy per method"),
        ("stability", "Training stability"),
        ("convergence", "Convergence"),
        ("reward_model", "Learned reward against the rule check"),
    ];
    let drawn: Vec<_> =
        charts.iter().filter(|(file, _)| dir.join("charts").join(format!("{file}.svg")).is_file()).collect();
    if !drawn.is_empty() {
        report.push_str("\n## Charts\n\n");
        for (file, title) in drawn {
            report.push_str(&format!("### {title}\n\n![{title}](charts/{file}.svg)\n\n"));
        }
    }
    let diverged: Vec<&CellSummary> = summaries.iter().filter(|s| s.is_diverged()).collect();
    if !diverged.is_empty() {
        report.push_str(&format!(
            "\n## Diverged cells\n\nTheir training diverged (a NaN or infinite loss or gradient, or one step's update larger than {DIVERGENCE_UPDATE_RATIO} x the norm of the policy's weights): they are no result and count in no mean, interval or chart above. Their step rows up to the divergence are in `cells/<id>/metrics.csv`.\n\n"
        ));
        for cell in diverged {
            report.push_str(&format!(
                "- {} / {} / seed {}: {}\n",
                cell.method,
                cell.reward_source,
                cell.seed,
                cell.error.as_deref().unwrap_or("")
            ));
        }
    }
    let failed: Vec<&CellSummary> = summaries.iter().filter(|s| s.is_failed()).collect();
    if !failed.is_empty() {
        report.push_str(
            "\n## Failed cells\n\nRerun `cargo xtask compare` to retry them (finished cells are skipped).\n\n",
        );
        for cell in failed {
            report.push_str(&format!(
                "- {} / {} / seed {}: {}\n",
                cell.method,
                cell.reward_source,
                cell.seed,
                cell.error.as_deref().unwrap_or("")
            ));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(method: &str, seed: u64) -> Cell {
        Cell { method: method.to_string(), reward_source: "rules".to_string(), seed }
    }

    fn finished(method: &str, seed: u64, lenient: f64) -> CellSummary {
        CellSummary {
            accuracy_strict: Some(lenient / 2.0),
            accuracy_strict_ci_low: Some(0.0),
            accuracy_strict_ci_high: Some(lenient),
            accuracy_lenient: Some(lenient),
            accuracy_lenient_ci_low: Some(lenient - 0.1),
            accuracy_lenient_ci_high: Some(lenient + 0.1),
            test_problems: 40,
            steps_to_convergence: Some(3),
            status: CellStatus::Finished,
            error: None,
            ..failed_summary(&cell(method, seed), String::new())
        }
    }

    /// A failed cell's summary has no accuracy at all (it was NaN, which JSON writes as `null`
    /// and `plot` refused), reads back, and keeps summary.csv's columns aligned.
    #[test]
    fn failed_summaries_have_absent_accuracies_and_aligned_csv_rows() {
        let failed = failed_summary(&cell("grpo", 1), "step 2: out of memory".to_string());
        let json = serde_json::to_string(&failed).unwrap();
        assert!(
            !json.contains("accuracy_strict") && !json.contains("accuracy_lenient") && !json.contains("NaN"),
            "{json}"
        );
        assert!(json.contains(r#""status":"failed""#), "{json}");
        assert_eq!(serde_json::from_str::<CellSummary>(&json).unwrap(), failed);
        assert!(failed.is_failed() && !failed.is_result() && !failed.is_diverged());
        // What earlier versions wrote for a failed cell: null accuracies, no status.
        let old = r#"{"method":"grpo","reward_source":"rules","seed":0,"accuracy_strict":null,"accuracy_strict_ci_low":null,"accuracy_strict_ci_high":null,"accuracy_lenient":null,"accuracy_lenient_ci_low":null,"accuracy_lenient_ci_high":null,"test_problems":0,"train_seconds":0.0,"steps_to_convergence":null,"update_norm_variance":null,"error":"boom"}"#;
        let old: CellSummary = serde_json::from_str(old).unwrap();
        assert!(old.is_failed() && old.accuracy_strict.is_none());
        let done = finished("grpo", 0, 0.5);
        assert!(done.is_result() && !done.is_failed());
        // summary.csv: the same columns as summary.json's fields, every row as wide as the header.
        let mut writer = csv::Writer::from_writer(Vec::new());
        for summary in [&failed, &done] {
            writer.serialize(SummaryCsvRow::from(summary)).unwrap();
        }
        let text = String::from_utf8(writer.into_inner().unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let header: std::collections::BTreeSet<&str> = lines[0].split(',').collect();
        let value = serde_json::to_value(&done).unwrap();
        let keys: std::collections::BTreeSet<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(header, keys, "SummaryCsvRow and CellSummary differ");
        assert!(
            lines[0].starts_with("method,reward_source,seed,accuracy_strict,") && lines[0].ends_with(",error,status"),
            "{text}"
        );
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].starts_with("grpo,rules,1,,,,,,,0,") && lines[1].ends_with(",step 2: out of memory,failed"),
            "{text}"
        );
        assert!(lines[2].starts_with("grpo,rules,0,0.25,0.0,0.5,0.5,") && lines[2].ends_with(",,finished"), "{text}");
    }

    /// Rows reach the disk as they come (a crash keeps them), and a row with a new column widens
    /// the header of the rows before it: the finished file is one table.
    #[test]
    fn metrics_rows_are_on_disk_after_each_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let mut file = MetricsFile::create(&cell("grpo", 2), dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "method,reward_source,seed,step\n");
        let row = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<rl_algos::Metrics>();
        file.push(&row(&[("step", 0.0), ("eval/accuracy_lenient", 0.25)])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "method,reward_source,seed,step,eval/accuracy_lenient\ngrpo,rules,2,0,0.25\n"
        );
        file.push(&row(&[("step", 1.0), ("reward", 0.5), ("loss", 1.5)])).unwrap();
        file.push(&row(&[("step", 2.0), ("reward", 0.75), ("loss", 1.25), ("eval/accuracy_lenient", 0.5)])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "method,reward_source,seed,step,eval/accuracy_lenient,loss,reward\ngrpo,rules,2,0,0.25,,\ngrpo,rules,2,1,,1.5,0.5\ngrpo,rules,2,2,0.5,1.25,0.75\n"
        );
        let written = std::fs::read_to_string(&path).unwrap();
        file.push(&row(&[("step", 3.0), ("reward", 0.8), ("entropy", 2.0)])).unwrap();
        // A resumed cell keeps the rows of its checkpoint, byte for byte, and drops the rest.
        MetricsFile::restore(&cell("grpo", 2), dir.path(), file.rows[..3].to_vec()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), written);
        // A fresh file for a rerun of the cell starts over.
        MetricsFile::create(&cell("grpo", 2), dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    /// report.md: a diverged or failed seed counts in no mean; a group with no result says why;
    /// both are listed with their reasons.
    #[test]
    fn the_report_leaves_cells_without_a_result_out_of_the_means() {
        let dir = tempfile::tempdir().unwrap();
        let diverged = unfinished_summary(
            &cell("grpo", 1),
            CellStatus::Diverged,
            "step 1: update_norm 3e4 exceeds".to_string(),
            2.0,
        );
        let hot = unfinished_summary(&cell("hot", 0), CellStatus::Diverged, "step 2: the loss is NaN".to_string(), 2.0);
        let failed = failed_summary(&cell("ppo", 0), "panic: boom".to_string());
        let report = report_markdown(dir.path(), &[finished("grpo", 0, 0.5), diverged, hot, failed]);
        assert!(report.contains("| grpo | rules | 1 | 50.0% [40.0, 60.0] | 25.0% "), "{report}");
        assert!(
            report.contains("| hot | rules | 0 | diverged | diverged |")
                && report.contains("| ppo | rules | 0 | failed | failed |"),
            "{report}"
        );
        let diverged_section =
            &report[report.find("## Diverged cells").unwrap()..report.find("## Failed cells").unwrap()];
        assert!(diverged_section.contains("- grpo / rules / seed 1: step 1: update_norm 3e4 exceeds\n- hot / rules / seed 0: step 2: the loss is NaN\n"), "{report}");
        assert!(report.ends_with("- ppo / rules / seed 0: panic: boom\n"), "{report}");
    }
}
