//! `cargo xtask`: cotlab's command line. This file only parses arguments and dispatches; each
//! subcommand lives in its own module.

mod bench;
mod common;
mod compare;
mod generate;
mod heap;
mod logits;
mod plot;
mod reward_model;
mod score;
mod study;

use clap::{Parser, Subcommand};

/// mimalloc's `mi_option_purge_delay` (position 15 of `mi_option_e` in mimalloc v3's header;
/// the bindings name the next one, `mi_option_use_numa_nodes`, 16).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory instead of returning it to the OS a moment later: a training or decoding
/// step frees and reallocates the same large buffers, and each return cost a page fault and the
/// kernel zeroing the pages again (`clear_page_erms`, a fifth of a d=256 training profile;
/// `MIMALLOC_SHOW_STATS=1` reported 861 MiB purged in a 3-step benchmark, 0 with this).
/// The option is set only when it reads as a documented default (10 ms in mimalloc v2, 1000 ms
/// in the v3 that `libmimalloc-sys` builds), which also checks the position;
/// `MIMALLOC_PURGE_DELAY` in the environment wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: plain option getter and setter of the allocator in use, called before any thread starts.
    unsafe {
        if matches!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 10 | 1000) {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

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
    keep_freed_memory();
    let _heap_profile = heap::profile_from_env();
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
