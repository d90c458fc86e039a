//! `cargo xtask`: cotlab's command line. This file only parses arguments and dispatches; each
//! subcommand lives in its own module.

mod compare;
mod generate;
mod logits;
mod plot;
mod score;

use clap::{Parser, Subcommand};

/// cotlab: GRPO vs PPO vs few-shot chain-of-thought prompting for math reasoning.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a comparison study (method x model x reward source x seed) and write reports/.
    Compare(compare::Args),
    /// Render accuracy, stability and convergence charts of a study.
    Plot(plot::Args),
    /// Score completions against gold answers: strict and lenient accuracy with 95% CIs.
    Score(score::Args),
    /// Print a checkpoint's logits at every position of a token sequence, as JSON.
    Logits(logits::Args),
    /// Generate a continuation with a checkpoint (greedy or sampled, KV-cached).
    Generate(generate::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Compare(args) => compare::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Score(args) => score::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Generate(args) => generate::run(args),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader never sees a half-written file and an interrupted write leaves the old one intact.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let temporary = dir.join(format!(".{}.tmp", path.file_name().and_then(|name| name.to_str()).unwrap_or("output")));
    std::fs::write(&temporary, bytes).with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot move {} to {}", temporary.display(), path.display()))?;
    Ok(())
}
