//! `cargo xtask`: cotlab's command line. This file only parses arguments and dispatches; each
//! subcommand lives in its own module.

mod compare;
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Compare(args) => compare::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Score(args) => score::run(args),
    }
}
