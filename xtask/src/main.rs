//! `cargo xtask`: cotlab's command line. This file only parses arguments and dispatches; each
//! subcommand lives in its own module.

mod bench;
mod common;
mod compare;
mod generate;
mod logits;
mod plot;
mod reward_model;
mod score;
mod study;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Measure training and generation throughput beside PyTorch (release build).
    Bench(bench::Args),
    /// Train the tiny reward model on synthetic comparisons and report held-out accuracy.
    RewardModel(reward_model::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Compare(args) => compare::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Score(args) => score::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::RewardModel(args) => reward_model::run(args),
    }
}
