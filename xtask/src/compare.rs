//! `cargo xtask compare [study.toml]`: runs a comparison study. Today it reads and validates the
//! study file and, with `--dry-run`, prints the matrix; running the cells comes with the study issue.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[allow(dead_code, reason = "the options are read by the study runner, which is not here yet")]
pub struct Args {
    /// The study file (TOML); `configs/default.toml` when none is named.
    study: Option<PathBuf>,
    /// A named preset of the default study (`quick` runs the whole pipeline in minutes).
    #[arg(long)]
    preset: Option<String>,
    /// Print the matrix and an estimate of its cost, and run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Redo cells that are already complete.
    #[arg(long)]
    force: bool,
    /// Plain log lines instead of progress bars.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = args.study.clone().unwrap_or_else(|| PathBuf::from("configs/default.toml"));
    let study = crate::study::config::Study::load(&path)?;
    let matrix = study.matrix();
    if args.dry_run {
        println!("study {} ({}): {} cells on {}", study.name, path.display(), matrix.len(), study.backend);
        for cell in &matrix {
            println!("  {:<40} method {:<20} reward source {:<14} seed {}", cell.id(), cell.method, cell.reward_source, cell.seed);
        }
        return Ok(());
    }
    anyhow::bail!(
        "{}: the study file is valid ({} cells), but running a study is not in this build of cotlab yet; \
         `--dry-run` shows the matrix",
        path.display(),
        matrix.len()
    )
}
