//! `cargo xtask compare [study.toml]`: runs a comparison study. The study runner is the subject
//! of its own issue; until it lands this entry point parses its arguments and says so.

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
    let study = args.study.unwrap_or_else(|| PathBuf::from("configs/default.toml"));
    anyhow::bail!(
        "`compare` cannot run {} yet: the study runner (models, algorithms, reward model) is not \
         in this build of cotlab; `cargo xtask score` works today",
        study.display()
    )
}
