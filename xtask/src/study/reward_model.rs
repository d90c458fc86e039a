//! The reward-model stage: trained (or fine-tuned) once per study on comparisons from the
//! task, evaluated on comparisons from the test split, and loaded as a reward function.
//!
//! The comparisons are synthetic (a worked solution against a spoiled copy), and, with
//! `[reward_model] policy_samples`, also between the base policy's own answers, one the rule
//! checker judges right against one it judges wrong: the text PPO will ask the reward model to
//! score, which the synthetic kinds only imitate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::tensor::Device;
use eval::score_completion;
use policy_models::generate::Sampler;
use policy_models::{CausalLm, ModelSource, PolicyTokenizer};
use prompting::PromptBuilder;
use reward_model::comparisons::{Comparison, Corruption, build_comparisons, policy_sample_pairs};
use reward_model::reward::RewardModelFunction;
use reward_model::train::{RewardTokenizer, RewardTrainer};
use reward_model::{CausalRewardModel, LikelihoodRewardModel, RewardModel, RobertaConfig, RobertaRegressor, RowLayout};
use rl_algos::rewards::RewardFunction;
use serde::{Deserialize, Serialize};
use tasks::{Problem, TaskData};

use crate::common::{install_dir, partial_dir, write_atomically};
use crate::study::config::{CausalScore, DEFAULT_LIKELIHOOD_BETA, PolicySamples, RewardModelSpec, Study};
use crate::study::evaluate::sample_draws;
use crate::study::identity::{Check, IDENTITY_FILE, Identity, reward_model_config};
use crate::study::progress::Progress;
use crate::study::prompts::prompt_builder;

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
    /// `broken_format`, and `policy_sample` with `policy_samples`).
    #[serde(default)]
    pub held_out_accuracy_by_corruption: std::collections::BTreeMap<String, f64>,
    /// Held-out pairs per kind of rejected answer.
    #[serde(default)]
    pub held_out_pairs_by_corruption: std::collections::BTreeMap<String, usize>,
    /// The same accuracies of the starting model, before its first step: what training added
    /// (a pretrained model's own likelihood checks some kinds already). Absent when the training
    /// resumed from a checkpoint.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub held_out_accuracy_at_start_by_corruption: std::collections::BTreeMap<String, f64>,
    /// What sampling the base policy gave, with `policy_samples`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_samples: Option<PolicySampleCounts>,
    /// Loss of the last training step.
    pub final_loss: f64,
    /// Optimizer steps.
    pub steps: u64,
    /// Training seconds.
    pub train_seconds: f64,
    /// Longest input the causal-LM reward model reads (it is read back with the same length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
}

/// What the base policy's samples gave, per split (`train`, `held_out`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicySampleCounts {
    /// Training split: questions sampled, those with both a correct and an incorrect sample,
    /// comparisons, and the fraction of samples judged correct.
    pub train: SampleSplitCounts,
    /// The same on the test split (held-out comparisons).
    pub held_out: SampleSplitCounts,
}

/// Counts of one split's policy samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleSplitCounts {
    /// Questions sampled.
    pub questions: usize,
    /// Questions with at least one correct and one incorrect sample (the others give no pair).
    pub questions_with_pairs: usize,
    /// Comparisons built.
    pub pairs: usize,
    /// Fraction of all samples the rule checker judged correct (the base's sample accuracy).
    pub sample_accuracy: f64,
}

/// Comparisons from sampled completions: `samples[i]` are completions of `problems[i]`, each
/// judged by `is_correct`; every correct x incorrect pair of a question (correct chosen), up to
/// `max_pairs` per question. Questions whose samples all agree give none.
pub(crate) fn label_and_pair(
    problems: &[Problem],
    samples: &[Vec<String>],
    is_correct: impl Fn(&str, &Problem) -> bool,
    max_pairs: usize,
) -> (Vec<Comparison>, SampleSplitCounts) {
    let mut pairs = Vec::new();
    let (mut with_pairs, mut correct_samples, mut all_samples) = (0, 0, 0);
    for (problem, completions) in problems.iter().zip(samples) {
        let (correct, incorrect): (Vec<String>, Vec<String>) =
            completions.iter().cloned().partition(|completion| is_correct(completion, problem));
        correct_samples += correct.len();
        all_samples += completions.len();
        let found = policy_sample_pairs(&problem.question, &correct, &incorrect, max_pairs);
        with_pairs += usize::from(!found.is_empty());
        pairs.extend(found);
    }
    let counts = SampleSplitCounts {
        questions: problems.len().min(samples.len()),
        questions_with_pairs: with_pairs,
        pairs: pairs.len(),
        sample_accuracy: correct_samples as f64 / all_samples.max(1) as f64,
    };
    (pairs, counts)
}

/// Samples the base policy in `base_dir` on the first `settings.problems` questions of train
/// (training pairs) and of test (held-out pairs), and pairs its answers by lenient correctness
/// against the gold answer (the rule checker of the study's template format).
fn base_policy_pairs(
    study: &Study,
    task: &TaskData,
    (base_dir, builder): (&Path, &PromptBuilder),
    settings: &PolicySamples,
    seed: u64,
    device: &Device,
    progress: &Progress,
) -> anyhow::Result<(Vec<Comparison>, Vec<Comparison>, PolicySampleCounts)> {
    let policy = CausalLm::load_dir(base_dir, device).with_context(|| format!("loading {}", base_dir.display()))?;
    let tokenizer = PolicyTokenizer::load_dir(base_dir)?;
    let sampler = Sampler::Sample { temperature: settings.temperature, top_k: None, top_p: None };
    let format = study.policy.template.answer_format();
    let split_pairs = |split: &str, problems: &[Problem], seed: u64| {
        let problems = &problems[..settings.problems.min(problems.len())];
        let label =
            |draw: usize| format!("reward model: policy samples ({split}) draw {}/{}", draw + 1, settings.samples);
        let samples = sample_draws(
            study,
            (&policy, &tokenizer, builder),
            problems,
            (sampler, settings.max_new_tokens),
            settings.samples,
            seed,
            (progress, &label),
        )?;
        let (pairs, counts) = label_and_pair(
            problems,
            &samples,
            |completion, problem| score_completion(completion, &problem.answer, format).lenient,
            settings.max_pairs_per_problem,
        );
        progress.log(format!(
            "reward model: {} base-policy samples on {} {split} questions ({:.1}% correct): {} questions with both a correct and an incorrect sample, {} pairs",
            settings.samples,
            counts.questions,
            counts.sample_accuracy * 100.0,
            counts.questions_with_pairs,
            counts.pairs
        ));
        anyhow::Ok((pairs, counts))
    };
    let (train, train_counts) = split_pairs("train", &task.train.problems, seed)?;
    let (held_out, held_out_counts) = split_pairs("test", &task.test.problems, seed + 1)?;
    Ok((train, held_out, PolicySampleCounts { train: train_counts, held_out: held_out_counts }))
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
    let training = match spec {
        RewardModelSpec::Checkpoint { model, fine_tune: None, .. } => {
            return Ok(Some(ModelSource::parse(model)?.resolve()?));
        }
        RewardModelSpec::Checkpoint { fine_tune: Some(training), .. }
        | RewardModelSpec::Train { training, .. }
        | RewardModelSpec::CausalLm { training, .. } => training,
    };
    let rm_dir = dir.join("reward_model");
    // `run_study` has checked the identity of a reward model already there (or removed it).
    if rm_dir.join(IDENTITY_FILE).is_file() && rm_dir.join("metrics.json").is_file() {
        progress.log(format!("reward model: {} (trained earlier)", rm_dir.display()));
        return Ok(Some(rm_dir));
    }
    let identity = Identity::new(
        reward_model_config(study)?.context("a reward model is prepared only when a reward source uses it")?,
    );
    let partial = partial_dir(&rm_dir);
    // `training.checkpoint_every` steps write the trainer here (with the stage's identity), so a
    // killed run resumes its training; a checkpoint of other settings is dropped.
    let checkpoint = Checkpoint { dir: dir.join(".reward_model.checkpoint"), identity: &identity };
    let resume = checkpoint.usable(progress)?;
    let autodiff = device.clone().autodiff();
    autodiff.seed(training.seed);
    // Zero-shot prompts as the policy's rollouts present them, to the base when it samples and to
    // the reward model when it scores: through the checkpoint's chat template when the study
    // uses one.
    let builder = prompt_builder(study, task, base_dir, 0, training.seed)?;
    let mut train = build_comparisons(&task.train, study.policy.template, 2, training.seed);
    let mut held_out = build_comparisons(&task.test, study.policy.template, 1, training.seed + 1);
    let mut sample_counts = None;
    if let Some(settings) = spec.policy_samples() {
        let (train_pairs, held_out_pairs, counts) =
            base_policy_pairs(study, task, (base_dir, &builder), settings, training.seed, device, progress)?;
        train.extend(train_pairs);
        held_out.extend(held_out_pairs);
        sample_counts = Some(counts);
    }
    let train = as_rollouts(train, &builder)?;
    let held_out = as_rollouts(held_out, &builder)?;
    // Written whole into `.reward_model.partial`, then renamed: `reward_model/` exists only
    // complete (metrics.json and identity.json included).
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    let (tokenizer, report, held_out_scores) = match spec {
        RewardModelSpec::CausalLm { model, from_base, lora, max_tokens, score, beta, .. } => {
            let start = if *from_base {
                base_dir.to_path_buf()
            } else {
                ModelSource::parse(model.as_deref().context("reward_model.model")?)?.resolve()?
            };
            // The causal reward model reads text with its own (the policy family's) tokenizer.
            let tokenizer = PolicyTokenizer::load_dir(&start)
                .with_context(|| format!("the reward model's start {} has no tokenizer", start.display()))?;
            let reward_tokenizer = RewardTokenizer::new(tokenizer.clone(), *max_tokens);
            let lora_note = if lora.is_some() { ", LoRA" } else { "" };
            let adapt = |error: String| anyhow::anyhow!("reward_model.lora.{error}");
            let (mut report, scores) = match score {
                CausalScore::LastToken => {
                    // Its padding id is the one the tokenizer pads with, so the scored token is found.
                    let pad = tokenizer.pad_id.or(tokenizer.eos_ids.first().copied()).unwrap_or(0);
                    let (model, head) = CausalRewardModel::load_dir(&start, Some(pad), &autodiff)?;
                    progress.log(format!(
                        "reward model: causal LM from {} (score head {head:?}{lora_note})",
                        start.display()
                    ));
                    let model = match lora {
                        Some(lora) => model.with_lora(lora).map_err(adapt)?,
                        None => model,
                    };
                    let trainer = match resume {
                        true => RewardTrainer::resume_causal(model, &checkpoint.dir, training.clone())?,
                        false => RewardTrainer::start(model, training.clone())?,
                    };
                    let (model, report, scores) =
                        train_reward_model(trainer, &train, &held_out, &reward_tokenizer, &checkpoint, progress)?;
                    model.save_dir(&partial)?;
                    (report, scores)
                }
                CausalScore::Likelihood => {
                    let beta = beta.unwrap_or(DEFAULT_LIKELIHOOD_BETA);
                    let model = LikelihoodRewardModel::load_dir(&start, Some(beta), &autodiff)?;
                    progress.log(format!(
                        "reward model: {} as its own verifier (mean completion log-prob x {beta}{lora_note})",
                        start.display()
                    ));
                    let model = match lora {
                        Some(lora) => model.with_lora(lora).map_err(adapt)?,
                        None => model,
                    };
                    let reward_tokenizer = reward_tokenizer.with_layout(RowLayout::Continuation);
                    let trainer = match resume {
                        true => RewardTrainer::resume_likelihood(model, &checkpoint.dir, training.clone())?,
                        false => RewardTrainer::start(model, training.clone())?,
                    };
                    let (model, report, scores) =
                        train_reward_model(trainer, &train, &held_out, &reward_tokenizer, &checkpoint, progress)?;
                    model.save_dir(&partial)?;
                    (report, scores)
                }
            };
            report.max_tokens = Some(*max_tokens);
            (tokenizer, report, scores)
        }
        RewardModelSpec::Checkpoint { .. } | RewardModelSpec::Train { .. } => {
            let (tokenizer, model) = match spec {
                RewardModelSpec::Checkpoint { model: checkpoint, .. } => {
                    let checkpoint = ModelSource::parse(checkpoint)?.resolve()?;
                    let tokenizer = PolicyTokenizer::load_dir(&checkpoint)
                        .with_context(|| format!("the reward model in {} has no tokenizer", checkpoint.display()))?;
                    let (model, head) = RobertaRegressor::load_dir(&checkpoint, &autodiff)?;
                    progress
                        .log(format!("reward model: fine-tuning {} (regression head {head:?})", checkpoint.display()));
                    (tokenizer, model)
                }
                RewardModelSpec::Train { hidden_size, num_layers, intermediate_size, .. } => {
                    // The tiny reward model reads text with the base policy's tokenizer (trained on
                    // the same problems).
                    let tokenizer = PolicyTokenizer::load_dir(base_dir)?;
                    let pad = tokenizer.pad_id.or(tokenizer.eos_ids.first().copied()).unwrap_or(0);
                    let config = RobertaConfig::tiny(tokenizer.vocab_size(), pad, *hidden_size, *num_layers, 192)
                        .with_intermediate_size(*intermediate_size);
                    (tokenizer, RobertaRegressor::init(&config, &autodiff))
                }
                _ => unreachable!("the RoBERTa kinds"),
            };
            let reward_tokenizer = RewardTokenizer::new(tokenizer.clone(), model.config().max_tokens());
            let trainer = match resume {
                true => RewardTrainer::resume(&checkpoint.dir, training.clone(), &autodiff)?,
                false => RewardTrainer::new(model, training.clone()),
            };
            let (model, report, scores) =
                train_reward_model(trainer, &train, &held_out, &reward_tokenizer, &checkpoint, progress)?;
            model.without_token_head().save_dir(&partial)?;
            (tokenizer, report, scores)
        }
    };
    let report = RewardModelReport { policy_samples: sample_counts, ..report };
    tokenizer.save(&partial.join("tokenizer.json"))?;
    write_atomically(&partial.join("metrics.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    let mut lines = String::new();
    for score in &held_out_scores {
        lines.push_str(&serde_json::to_string(score)?);
        lines.push('\n');
    }
    write_atomically(&partial.join(HELD_OUT_SCORES_FILE), lines.as_bytes())?;
    identity.write(&partial)?;
    install_dir(&partial, &rm_dir)?;
    checkpoint.remove()?;
    progress.log(format!(
        "reward model: held-out pairwise accuracy {:.1}% over {} pairs (test split; {}), margin {:.3}, {:.0} s",
        report.held_out_accuracy * 100.0,
        report.held_out_pairs,
        report
            .held_out_accuracy_by_corruption
            .iter()
            .map(|(kind, accuracy)| format!("{kind} {:.1}%", accuracy * 100.0))
            .collect::<Vec<_>>()
            .join(", "),
        report.held_out_mean_margin,
        report.train_seconds
    ));
    Ok(Some(rm_dir))
}

/// The reward-model stage's training checkpoint: the trainer's files and the stage's identity.
struct Checkpoint<'a> {
    dir: PathBuf,
    identity: &'a Identity,
}

impl Checkpoint<'_> {
    /// Whether a checkpoint of these settings is there to resume; one of other settings (or
    /// without an identity, killed while writing) is removed.
    fn usable(&self, progress: &Progress) -> anyhow::Result<bool> {
        match crate::study::identity::check(&self.dir, self.identity)? {
            Check::Matches => Ok(true),
            Check::Absent => Ok(false),
            Check::Differs(lines) => {
                progress.log(format!(
                    "reward model: dropping the training checkpoint in {} ({})",
                    self.dir.display(),
                    lines.join("; ")
                ));
                self.remove()?;
                Ok(false)
            }
        }
    }

    fn write<M: RewardModel>(&self, trainer: &RewardTrainer<M>) -> anyhow::Result<()> {
        trainer.save_checkpoint(&self.dir)?;
        self.identity.write(&self.dir)
    }

    fn remove(&self) -> anyhow::Result<()> {
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).with_context(|| format!("cannot remove {}", self.dir.display()))?;
        }
        Ok(())
    }
}

/// One held-out pair and its scores: a line of `reward_model/held_out_scores.jsonl`, so that what
/// the reward model ranks right and wrong can be read pair by pair (by question, by length).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HeldOutScore {
    /// How the rejected answer was made (`policy_sample`: the base's own wrong answer).
    pub corruption: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// The trained model's scores of chosen and rejected.
    pub chosen_score: f32,
    pub rejected_score: f32,
    /// The starting model's `[chosen, rejected]` scores; absent when training resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_start: Option<[f32; 2]>,
}

/// The file of [`HeldOutScore`]s in a reward model's directory.
pub(crate) const HELD_OUT_SCORES_FILE: &str = "held_out_scores.jsonl";

/// Trains for the configured steps (from where a resumed `trainer` stands, writing `checkpoint`
/// every `checkpoint_every` steps), then evaluates on `held_out` per kind of rejected answer.
fn train_reward_model<M: RewardModel>(
    mut trainer: RewardTrainer<M>,
    train: &[Comparison],
    held_out: &[Comparison],
    reward_tokenizer: &RewardTokenizer,
    checkpoint: &Checkpoint<'_>,
    progress: &Progress,
) -> anyhow::Result<(M, RewardModelReport, Vec<HeldOutScore>)> {
    let kind_name = |kind: Corruption| {
        serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    };
    let per_kind = |scores: &[[f32; 2]]| {
        reward_model::train::metrics_by_corruption(held_out, scores)
            .into_iter()
            .map(|(kind, metrics)| (kind_name(kind), metrics))
            .collect::<Vec<_>>()
    };
    let start_scores = match trainer.step() {
        0 => Some(reward_model::train::pair_scores(trainer.model(), reward_tokenizer, held_out, 64)),
        _ => None,
    };
    let at_start: std::collections::BTreeMap<String, f64> = match &start_scores {
        Some(scores) => per_kind(scores).into_iter().map(|(kind, metrics)| (kind, metrics.accuracy)).collect(),
        None => Default::default(),
    };
    if !at_start.is_empty() {
        progress.log(format!(
            "reward model: held-out pairwise accuracy before training: {}",
            at_start
                .iter()
                .map(|(kind, accuracy)| format!("{kind} {:.1}%", accuracy * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let steps = trainer.config().steps;
    let every = trainer.config().checkpoint_every;
    let mut bar = progress.bar(steps, "reward model", 1);
    if trainer.step() > 0 {
        progress.log(format!("reward model: resuming at step {} of {steps}", trainer.step()));
        bar.set_position(trainer.step());
    }
    let started = Instant::now();
    let mut final_loss = f64::NAN;
    while trainer.step() < steps {
        let step = trainer.train_step(train, reward_tokenizer)?;
        final_loss = step.loss;
        bar.set_message(format!("loss {:.3} acc {:.2}", step.loss, step.accuracy));
        bar.inc(1);
        if every > 0 && trainer.step().is_multiple_of(every) && trainer.step() < steps {
            checkpoint.write(&trainer)?;
        }
    }
    drop(bar);
    let train_seconds = started.elapsed().as_secs_f64();
    let scores = reward_model::train::pair_scores(trainer.model(), reward_tokenizer, held_out, 64);
    let per_kind = per_kind(&scores);
    let metrics =
        reward_model::train::PairMetrics::pooled(&per_kind.iter().map(|(_, metrics)| *metrics).collect::<Vec<_>>());
    let by_corruption = per_kind.iter().map(|(kind, metrics)| (kind.clone(), metrics.accuracy)).collect();
    let pairs_by_corruption = per_kind.iter().map(|(kind, metrics)| (kind.clone(), metrics.pairs)).collect();
    let report = RewardModelReport {
        held_out_accuracy: metrics.accuracy,
        held_out_mean_margin: metrics.mean_margin,
        held_out_pairs: metrics.pairs,
        held_out_accuracy_by_corruption: by_corruption,
        held_out_pairs_by_corruption: pairs_by_corruption,
        held_out_accuracy_at_start_by_corruption: at_start,
        policy_samples: None,
        final_loss,
        steps,
        train_seconds,
        max_tokens: None,
    };
    let held_out_scores = held_out
        .iter()
        .zip(&scores)
        .enumerate()
        .map(|(i, (pair, &[chosen_score, rejected_score]))| HeldOutScore {
            corruption: kind_name(pair.corruption),
            prompt: pair.prompt.clone(),
            chosen: pair.chosen.clone(),
            rejected: pair.rejected.clone(),
            chosen_score,
            rejected_score,
            at_start: start_scores.as_ref().map(|start| start[i]),
        })
        .collect();
    Ok((trainer.into_model(), report, held_out_scores))
}

/// The reward model of `rm_dir` as a reward function: the RoBERTa regressor when its
/// `config.json` says `model_type = "roberta"`, else the causal-LM reward model.
pub(crate) fn load_reward_function(
    rm_dir: &Path,
    device: &Device,
    normalize: bool,
) -> anyhow::Result<Box<dyn RewardFunction>> {
    let tokenizer = PolicyTokenizer::load_dir(rm_dir)
        .with_context(|| format!("the reward model in {} has no tokenizer", rm_dir.display()))?;
    let config_path = rm_dir.join("config.json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", config_path.display()))?;
    if config["model_type"] == "roberta" {
        let (model, _) = RobertaRegressor::load_dir(rm_dir, device)?;
        let reward_tokenizer = RewardTokenizer::new(tokenizer, model.config().max_tokens());
        return Ok(Box::new(RewardModelFunction::new(&model, reward_tokenizer, 32, normalize)));
    }
    // The length it was trained with (metrics.json), else the default.
    let metrics: Option<RewardModelReport> =
        std::fs::read_to_string(rm_dir.join("metrics.json")).ok().and_then(|text| serde_json::from_str(&text).ok());
    let max_tokens = metrics.and_then(|metrics| metrics.max_tokens).unwrap_or(512);
    let reward_tokenizer = RewardTokenizer::new(tokenizer, max_tokens);
    if let Some(beta) = LikelihoodRewardModel::saved_beta(rm_dir)? {
        let model = LikelihoodRewardModel::load_dir(rm_dir, Some(beta), device)?;
        let reward_tokenizer = reward_tokenizer.with_layout(RowLayout::Continuation);
        return Ok(Box::new(RewardModelFunction::new(&model, reward_tokenizer, 32, normalize)));
    }
    let pad = reward_tokenizer.pad_id() as u32;
    let (model, head) = CausalRewardModel::load_dir(rm_dir, Some(pad), device)?;
    anyhow::ensure!(
        head == reward_model::HeadSource::Loaded,
        "{}: no score head; it is not a trained reward model",
        rm_dir.display()
    );
    Ok(Box::new(RewardModelFunction::new(&model, reward_tokenizer, 32, normalize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(question: &str, answer: &str) -> Problem {
        Problem {
            id: format!("test-{question}"),
            question: question.to_string(),
            solution: String::new(),
            answer: answer.to_string(),
        }
    }

    /// A killed reward-model stage resumes from its checkpoint to the model an uninterrupted run
    /// trains; a checkpoint of other settings is dropped.
    #[test]
    fn the_stage_resumes_its_training_from_a_checkpoint() {
        use reward_model::train::RewardTrainingConfig;
        let task = tasks::synthetic::generate(&tasks::synthetic::SyntheticConfig {
            train_size: 40,
            test_size: 8,
            ..Default::default()
        })
        .unwrap();
        let template = prompting::Template::Plain;
        let corpus = task.train.problems.iter().map(|p| format!("{}\n{}", p.question, template.response(p)));
        let tokenizer = policy_models::presets::train_tokenizer(corpus, 256).unwrap();
        let config = RobertaConfig::tiny(tokenizer.vocab_size(), tokenizer.pad_id.unwrap_or(1), 16, 1, 120);
        let reward_tokenizer = RewardTokenizer::new(tokenizer, config.max_tokens());
        let train = build_comparisons(&task.train, template, 2, 0);
        let held_out = build_comparisons(&task.test, template, 1, 1);
        let training = RewardTrainingConfig { steps: 4, batch_size: 4, checkpoint_every: 3, ..Default::default() };
        let device = Device::flex().autodiff();
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::new(serde_json::json!({ "steps": 4 }));
        let checkpoint = Checkpoint { dir: dir.path().join("checkpoint"), identity: &identity };
        let progress = Progress::new(true);
        device.seed(0);
        let whole = RewardTrainer::new(RobertaRegressor::init(&config, &device), training.clone());
        let (whole, report, scores) =
            train_reward_model(whole, &train, &held_out, &reward_tokenizer, &checkpoint, &progress).unwrap();
        assert_eq!(report.held_out_accuracy_at_start_by_corruption.len(), 3, "{report:?}");
        // One line per held-out pair, in order, whose scores give the reported accuracy.
        assert_eq!(scores.len(), held_out.len());
        assert!(
            scores.iter().zip(&held_out).all(|(score, pair)| score.chosen == pair.chosen && score.at_start.is_some())
        );
        let right = scores.iter().filter(|score| score.chosen_score > score.rejected_score).count();
        assert!((right as f64 / scores.len() as f64 - report.held_out_accuracy).abs() < 1e-9, "{report:?}");
        // Written at step 3 of 4 (not at the end, when the model itself is saved).
        assert!(checkpoint.usable(&progress).unwrap());
        let resumed = RewardTrainer::resume(&checkpoint.dir, training, &device).unwrap();
        assert_eq!(resumed.step(), 3);
        let (resumed, report, scores) =
            train_reward_model(resumed, &train, &held_out, &reward_tokenizer, &checkpoint, &progress).unwrap();
        // A resumed run has no start to measure.
        assert!(report.held_out_accuracy_at_start_by_corruption.is_empty());
        assert!(scores.iter().all(|score| score.at_start.is_none()));
        let (whole, resumed) =
            (policy_models::optim::parameter_values(&whole), policy_models::optim::parameter_values(&resumed));
        assert_eq!(whole.keys().collect::<Vec<_>>(), resumed.keys().collect::<Vec<_>>());
        for (path, values) in &whole {
            let worst = values.iter().zip(&resumed[path]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-6, "{path}: the resumed run differs by {worst}");
        }
        let other = Identity::new(serde_json::json!({ "steps": 5 }));
        let stale = Checkpoint { dir: checkpoint.dir.clone(), identity: &other };
        assert!(!stale.usable(&progress).unwrap() && !checkpoint.dir.exists());
    }

    /// Only questions with both a correct and an incorrect sample give pairs; the correct one is
    /// chosen, each pair is a policy sample, and the cap holds per question.
    #[test]
    fn policy_pairs_come_from_questions_with_both_outcomes_correct_chosen() {
        let problems = [problem("1 + 1", "2"), problem("2 + 2", "4"), problem("3 + 3", "6"), problem("4 + 4", "8")];
        let samples: Vec<Vec<String>> = [
            vec!["2", "2"],           // all correct: no pair
            vec!["5", "3", "4"],      // one correct, two wrong: two pairs
            vec!["1", "0"],           // all wrong: no pair
            vec!["8", "8", "7", "9"], // two x two = four, capped at three
        ]
        .into_iter()
        .map(|answers| answers.into_iter().map(|a| format!("The answer is {a}.")).collect())
        .collect();
        let is_correct =
            |completion: &str, problem: &Problem| completion == format!("The answer is {}.", problem.answer);
        let (pairs, counts) = label_and_pair(&problems, &samples, is_correct, 3);
        let questions: Vec<&str> = pairs.iter().map(|pair| pair.prompt.as_str()).collect();
        assert_eq!(questions, ["2 + 2", "2 + 2", "4 + 4", "4 + 4", "4 + 4"]);
        for pair in &pairs {
            let problem = problems.iter().find(|p| p.question == pair.prompt).unwrap();
            assert!(is_correct(&pair.chosen, problem) && !is_correct(&pair.rejected, problem), "{pair:?}");
            assert_eq!((pair.corruption, &pair.rejected_error), (Corruption::PolicySample, &None));
        }
        assert_eq!(
            counts,
            SampleSplitCounts { questions: 4, questions_with_pairs: 2, pairs: 5, sample_accuracy: 5.0 / 11.0 }
        );
    }
}
