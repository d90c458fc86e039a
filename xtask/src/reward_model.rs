//! `cargo xtask reward-model [--steps N] [--out DIR]`: trains the default study's tiny reward
//! model from scratch on synthetic comparisons (train split) and reports its held-out pairwise
//! accuracy on comparisons built from the test split only.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use policy_models::BackendKind;
use policy_models::presets::train_tokenizer;
use prompting::Template;
use reward_model::comparisons::build_comparisons;
use reward_model::train::{PairMetrics, RewardTokenizer, RewardTrainer, RewardTrainingConfig, evaluate_by_corruption};
use reward_model::{RobertaConfig, RobertaRegressor};
use tasks::synthetic::{SyntheticConfig, generate};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Optimizer steps.
    #[arg(long, default_value_t = 600)]
    steps: u64,
    /// Pairs per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,
    /// Weight of the auxiliary token-level loss (0: pairwise loss only).
    #[arg(long, default_value_t = 0.0)]
    token_loss_weight: f64,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    hidden_size: usize,
    /// Encoder layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Feed-forward width (default: twice the model width, as the study's tiny model).
    #[arg(long)]
    intermediate_size: Option<usize>,
    /// Save the trained model (Hugging Face layout) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the comparisons (`train.jsonl`, `held_out.jsonl`, one pair per line with the
    /// error's bytes) and the tokenizer here, for outside tools (the PyTorch probes).
    #[arg(long)]
    dump_pairs: Option<PathBuf>,
    /// Seed of data, initialisation and batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Synthetic train problems (comparisons are built from them).
    #[arg(long, default_value_t = 4000)]
    train_size: usize,
    /// Synthetic test problems (held-out comparisons are built from them only).
    #[arg(long, default_value_t = 400)]
    test_size: usize,
    /// The burn backend.
    #[arg(long, default_value = "flex")]
    backend: BackendKind,
    /// The study whose synthetic task (operators, operand range, operations) the comparisons
    /// come from; `configs/default.toml` when it exists, else the generator's defaults.
    #[arg(long)]
    study: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let heads = RobertaConfig::TINY_HEADS;
    anyhow::ensure!(
        args.hidden_size > 0 && args.hidden_size.is_multiple_of(heads),
        "--hidden-size {}: use a positive multiple of {heads} (the tiny model's attention heads)",
        args.hidden_size
    );
    anyhow::ensure!(
        args.layers > 0 && args.intermediate_size != Some(0),
        "--layers and --intermediate-size must be at least 1"
    );
    let study_path = args.study.clone().or_else(|| Some(PathBuf::from("configs/default.toml")).filter(|p| p.is_file()));
    let base_task = match &study_path {
        Some(path) => match crate::study::config::Study::load(path)?.task {
            crate::study::config::TaskSpec::Synthetic { synthetic } => synthetic,
            crate::study::config::TaskSpec::Gsm8k { .. } => anyhow::bail!(
                "{}: the reward-model command trains on synthetic arithmetic; this study uses GSM8K",
                path.display()
            ),
        },
        None => SyntheticConfig { max_operations: 2, ..SyntheticConfig::default() },
    };
    let task = generate(&SyntheticConfig {
        train_size: args.train_size,
        test_size: args.test_size,
        seed: args.seed,
        ..base_task
    })?;
    let template = Template::Plain;
    let corpus: Vec<String> =
        task.train.problems.iter().map(|p| format!("{}\n{}", p.question, template.response(p))).collect();
    let tokenizer = train_tokenizer(corpus.into_iter(), 384)?;
    let device = args.backend.device()?.autodiff();
    device.seed(args.seed);
    let config =
        RobertaConfig::tiny(tokenizer.vocab_size(), tokenizer.pad_id.unwrap_or(1), args.hidden_size, args.layers, 120)
            .with_intermediate_size(args.intermediate_size);
    let reward_tokenizer = RewardTokenizer::new(tokenizer.clone(), config.max_tokens());
    let train = build_comparisons(&task.train, template, 2, args.seed);
    let held_out = build_comparisons(&task.test, template, 1, args.seed + 1);
    if let Some(dir) = &args.dump_pairs {
        std::fs::create_dir_all(dir)?;
        for (name, pairs) in [("train.jsonl", &train), ("held_out.jsonl", &held_out)] {
            let lines: Vec<String> = pairs.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
            crate::common::write_atomically(&dir.join(name), (lines.join("\n") + "\n").as_bytes())?;
        }
        tokenizer.save(&dir.join("tokenizer.json"))?;
        println!("comparisons and tokenizer written to {}", dir.display());
    }
    let training = RewardTrainingConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        warmup_steps: args.steps / 20,
        token_loss_weight: args.token_loss_weight,
        seed: args.seed,
        ..RewardTrainingConfig::default()
    };
    let mut trainer = RewardTrainer::new(RobertaRegressor::init(&config, &device), training);
    let progress =
        ProgressBar::new(args.steps).with_style(ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} eta {eta}")?);
    for _ in 0..args.steps {
        let step = trainer.train_step(&train, &reward_tokenizer)?;
        progress.set_message(format!("loss {:.3}", step.loss));
        progress.inc(1);
    }
    progress.finish_and_clear();
    let per_kind = evaluate_by_corruption(trainer.model(), &reward_tokenizer, &held_out, 64);
    let metrics = PairMetrics::pooled(&per_kind.iter().map(|(_, metrics)| *metrics).collect::<Vec<_>>());
    println!(
        "reward model: held-out pairwise accuracy {:.1}% over {} pairs (test split only), mean margin {:.3}",
        metrics.accuracy * 100.0,
        metrics.pairs,
        metrics.mean_margin
    );
    for (kind, by_kind) in per_kind {
        println!("  {kind:?}: {:.1}% of {} pairs", by_kind.accuracy * 100.0, by_kind.pairs);
    }
    if let Some(out) = args.out {
        trainer.into_model().without_token_head().save_dir(&out)?;
        tokenizer.save(&out.join("tokenizer.json"))?;
        println!("saved to {}", out.display());
    }
    Ok(())
}
