//! `cargo xtask compare [study.toml]`: runs a comparison study (see `study::run`), or with
//! `--dry-run` prints its matrix and an estimate of its cost.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The study file (TOML); `configs/default.toml` when none is named.
    study: Option<PathBuf>,
    /// A named preset of the default study (`quick` runs the whole pipeline in minutes).
    #[arg(long)]
    preset: Option<String>,
    /// Print the matrix and an estimate of its cost, and run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Redo what reports/<name>/ holds from other settings than the study file's (the base, the
    /// reward model, cells, their checkpoints; each keeps its settings in identity.json), instead
    /// of refusing to run. What was made with the same settings is kept (an interrupted cell
    /// resumes): to redo everything, remove reports/<name>/ or give the study a new name.
    #[arg(long)]
    force: bool,
    /// Plain log lines instead of progress bars.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = args.study.clone().unwrap_or_else(|| PathBuf::from("configs/default.toml"));
    let mut study = crate::study::config::Study::load(&path)?;
    match args.preset.as_deref() {
        None => {}
        Some("quick") => study.apply_quick_preset(),
        Some(other) => anyhow::bail!("--preset {other}: the only preset is `quick`"),
    }
    let matrix = study.matrix();
    for reference in study.unpinned_hub_references() {
        eprintln!(
            "note: {reference} is not pinned to a commit; a rerun may read other files (provenance.json records the commit it resolved to: pin it with @<commit>)"
        );
    }
    if args.dry_run {
        println!("study {} ({}): {} cells on {}", study.name, path.display(), matrix.len(), study.backend);
        let mut total = crate::study::config::CellCost::default();
        for cell in &matrix {
            let cost = study.cell_cost(cell)?;
            total = total + cost;
            println!(
                "  {:<40} method {:<14} reward source {:<14} seed {:<3} ~{} generated + ~{} trained tokens",
                cell.id(),
                cell.method,
                cell.reward_source,
                cell.seed,
                cost.generated_tokens,
                cost.trained_tokens
            );
        }
        println!(
            "total: ~{} generated and ~{} trained tokens in the cells, plus ~{} trained tokens for the base and reward model",
            total.generated_tokens,
            total.trained_tokens,
            study.preparation_tokens()
        );
        let policy_samples = study.preparation_generated_tokens();
        if policy_samples > 0 {
            println!("  and ~{policy_samples} generated tokens for the reward model's policy samples");
        }
        println!("{}", study.time_estimate(total));
        return Ok(());
    }
    let options =
        crate::study::run::RunOptions { reports: PathBuf::from("reports"), force: args.force, quiet: args.quiet };
    let summaries = crate::study::run::run_study(&study, &options)?;
    let dir = options.reports.join(&study.name);
    // Charts, then the report that shows them; a plotting problem costs neither the results nor the report.
    if let Err(error) = crate::plot::render(&dir) {
        eprintln!("charts not rendered: {error:#}");
    }
    crate::study::report::write_report_markdown(&dir, &summaries)?;
    let failed: Vec<String> = summaries.iter().filter(|s| s.is_failed()).map(|s| s.id()).collect();
    let diverged: Vec<String> = summaries.iter().filter(|s| s.is_diverged()).map(|s| s.id()).collect();
    println!(
        "study {}: {} cells, {} failed, {} diverged; reports in reports/{}/",
        study.name,
        summaries.len(),
        failed.len(),
        diverged.len(),
        study.name
    );
    if !diverged.is_empty() {
        // A diverged cell is an outcome of its settings, reported as such, not a broken run.
        println!("diverged (no result, listed in report.md): {}", diverged.join(", "));
    }
    // Every cell that could run has run and the reports cover them; the exit code still says
    // the study is incomplete, so scripts and CI do not take it for a full result.
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {} cells failed: {}; their errors are in reports/{}/report.md (\"Failed cells\"). Fix the cause and rerun `cargo xtask compare` (finished cells are skipped)",
            failed.len(),
            summaries.len(),
            failed.join(", "),
            study.name
        );
    }
    Ok(())
}
