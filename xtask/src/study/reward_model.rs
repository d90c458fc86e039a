//! The reward-model stage: trained (or fine-tuned) once per study on comparisons from the
//! task, evaluated on comparisons from the test split, and loaded as a reward function.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::tensor::Device;
use policy_models::{ModelSource, PolicyTokenizer};
use prompting::PromptBuilder;
use reward_model::comparisons::{Comparison, build_comparisons};
use reward_model::reward::RewardModelFunction;
use reward_model::train::{RewardTokenizer, RewardTrainer};
use reward_model::{RobertaConfig, RobertaRegressor};
use serde::{Deserialize, Serialize};
use tasks::TaskData;

use crate::common::{install_dir, partial_dir, write_atomically};
use crate::study::config::{RewardModelSpec, Study};
use crate::study::identity::{IDENTITY_FILE, Identity, reward_model_config};
use crate::study::progress::Progress;

/// Comparisons as the policy's rollouts present them to the reward model: the prompt the
/// policy is given (zero-shot) and the completion it writes after it.
pub(crate) fn as_rollouts(pairs: Vec<Comparison>, builder: &PromptBuilder) -> anyhow::Result<Vec<Comparison>> {
    let prefix = builder.template().response_prefix();
    let strip = |text: String| text.strip_prefix(prefix).map(str::to_string).unwrap_or(text);
    pairs
        .into_iter()
        .map(|pair| {
            // The error's bytes move with the rejected text's start.
            let removed = if pair.rejected.starts_with(prefix) { prefix.len() } else { 0 };
            Ok(Comparison {
                prompt: builder.render(&pair.prompt)?,
                chosen: strip(pair.chosen),
                rejected: strip(pair.rejected),
                corruption: pair.corruption,
                rejected_error: pair.rejected_error.map(|range| range.start - removed..range.end - removed),
            })
        })
        .collect()
}

/// The reward model's held-out figures, written beside it as `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardModelReport {
    /// Pairwise accuracy on comparisons built from the test split only.
    pub held_out_accuracy: f64,
    /// Mean score margin (chosen - rejected) on those pairs.
    pub held_out_mean_margin: f64,
    /// Held-out pairs.
    pub held_out_pairs: usize,
    /// Held-out pairwise accuracy per kind of rejected answer (`corrupted_step`, `wrong_answer`,
    /// `broken_format`).
    #[serde(default)]
    pub held_out_accuracy_by_corruption: std::collections::BTreeMap<String, f64>,
    /// Loss of the last training step.
    pub final_loss: f64,
    /// Optimizer steps.
    pub steps: u64,
    /// Training seconds.
    pub train_seconds: f64,
}

/// Trains (or locates) the reward model when a reward source uses one; returns its directory
/// (config.json, model.safetensors, tokenizer.json, metrics.json, identity.json).
pub(crate) fn prepare_reward_model(
    study: &Study,
    task: &TaskData,
    dir: &Path,
    base_dir: &Path,
    device: &Device,
    progress: &Progress,
) -> anyhow::Result<Option<PathBuf>> {
    let needed = study.reward_sources.values().any(|source| source.reward_model_weight.is_some());
    let Some(spec) = study.reward_model.as_ref().filter(|_| needed) else { return Ok(None) };
    let (checkpoint, training) = match spec {
        RewardModelSpec::Checkpoint { model, fine_tune: None } => return Ok(Some(ModelSource::parse(model)?.resolve()?)),
        RewardModelSpec::Checkpoint { model, fine_tune: Some(training) } => (Some(ModelSource::parse(model)?.resolve()?), training),
        RewardModelSpec::Train { training, .. } => (None, training),
    };
    let rm_dir = dir.join("reward_model");
    // `run_study` has checked the identity of a reward model already there (or removed it).
    if rm_dir.join(IDENTITY_FILE).is_file() && rm_dir.join("metrics.json").is_file() {
        progress.log(format!("reward model: {} (trained earlier)", rm_dir.display()));
        return Ok(Some(rm_dir));
    }
    let identity = Identity::new(reward_model_config(study)?.context("a reward model is prepared only when a reward source uses it")?);
    let partial = partial_dir(&rm_dir);
    let autodiff = device.clone().autodiff();
    autodiff.seed(training.seed);
    let (tokenizer, model) = match (&checkpoint, spec) {
        (Some(checkpoint), _) => {
            let tokenizer = PolicyTokenizer::load_dir(checkpoint).with_context(|| format!("the reward model in {} has no tokenizer", checkpoint.display()))?;
            let (model, head) = RobertaRegressor::load_dir(checkpoint, &autodiff)?;
            progress.log(format!("reward model: fine-tuning {} (regression head {head:?})", checkpoint.display()));
            (tokenizer, model)
        }
        (None, RewardModelSpec::Train { hidden_size, num_layers, intermediate_size, .. }) => {
            // The tiny reward model reads text with the base policy's tokenizer (trained on the
            // same problems).
            let tokenizer = PolicyTokenizer::load_dir(base_dir)?;
            let pad = tokenizer.pad_id.or(tokenizer.eos_ids.first().copied()).unwrap_or(0);
            let config = RobertaConfig::tiny(tokenizer.vocab_size(), pad, *hidden_size, *num_layers, 192).with_intermediate_size(*intermediate_size);
            (tokenizer, RobertaRegressor::init(&config, &autodiff))
        }
        (None, RewardModelSpec::Checkpoint { .. }) => unreachable!("a checkpoint spec has a checkpoint"),
    };
    let reward_tokenizer = RewardTokenizer::new(tokenizer.clone(), model.config().max_tokens());
    let builder = PromptBuilder::new(study.policy.template);
    let train = as_rollouts(build_comparisons(&task.train, study.policy.template, 2, training.seed), &builder)?;
    let held_out = as_rollouts(build_comparisons(&task.test, study.policy.template, 1, training.seed + 1), &builder)?;
    let mut bar = progress.bar(training.steps, "reward model", 1);
    let started = Instant::now();
    let mut trainer = RewardTrainer::new(model, training.clone());
    let mut final_loss = f64::NAN;
    for _ in 0..training.steps {
        let step = trainer.train_step(&train, &reward_tokenizer)?;
        final_loss = step.loss;
        bar.set_message(format!("loss {:.3} acc {:.2}", step.loss, step.accuracy));
        bar.inc(1);
    }
    drop(bar);
    let per_kind = reward_model::train::evaluate_by_corruption(trainer.model(), &reward_tokenizer, &held_out, 64);
    let metrics = reward_model::train::PairMetrics::pooled(&per_kind.iter().map(|(_, metrics)| *metrics).collect::<Vec<_>>());
    let by_corruption = per_kind
        .into_iter()
        .map(|(kind, metrics)| (serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(), metrics.accuracy))
        .collect();
    let report = RewardModelReport {
        held_out_accuracy: metrics.accuracy,
        held_out_mean_margin: metrics.mean_margin,
        held_out_pairs: metrics.pairs,
        held_out_accuracy_by_corruption: by_corruption,
        final_loss,
        steps: training.steps,
        train_seconds: started.elapsed().as_secs_f64(),
    };
    // Written whole into `.reward_model.partial`, then renamed: `reward_model/` exists only
    // complete (metrics.json and identity.json included).
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    trainer.into_model().without_token_head().save_dir(&partial)?;
    tokenizer.save(&partial.join("tokenizer.json"))?;
    write_atomically(&partial.join("metrics.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    identity.write(&partial)?;
    install_dir(&partial, &rm_dir)?;
    progress.log(
        format!(
            "reward model: held-out pairwise accuracy {:.1}% over {} pairs (test split; {}), margin {:.3}, {:.0} s",
            report.held_out_accuracy * 100.0,
            report.held_out_pairs,
            report.held_out_accuracy_by_corruption.iter().map(|(kind, accuracy)| format!("{kind} {:.1}%", accuracy * 100.0)).collect::<Vec<_>>().join(", "),
            report.held_out_mean_margin,
            report.train_seconds
        ),
    );
    Ok(Some(rm_dir))
}

/// The reward model of `rm_dir` as a reward function.
pub(crate) fn load_reward_function(rm_dir: &Path, device: &Device, normalize: bool) -> anyhow::Result<RewardModelFunction> {
    let (model, _) = RobertaRegressor::load_dir(rm_dir, device)?;
    let tokenizer = PolicyTokenizer::load_dir(rm_dir).with_context(|| format!("the reward model in {} has no tokenizer", rm_dir.display()))?;
    let reward_tokenizer = RewardTokenizer::new(tokenizer, model.config().max_tokens());
    Ok(RewardModelFunction::new(&model, reward_tokenizer, 32, normalize))
}
