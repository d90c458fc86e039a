//! Running a study: the base policy, the reward model, then every cell of the matrix, each
//! written atomically under `reports/<study>/` so that a rerun skips what is done.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use burn::tensor::Device;
use eval::{AccuracySummary, score_completion};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use policy_models::generate::{GenerationConfig, Sampler, generate};
use policy_models::optim::{AdamWSettings, Schedule};
use policy_models::presets::train_tokenizer;
use policy_models::train::{SftConfig, SftExample, SftTrainer};
use policy_models::{CausalLm, ModelSource, PolicyTokenizer};
use prompting::{PromptBuilder, sample_exemplars};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reward_model::comparisons::{Comparison, build_comparisons};
use reward_model::reward::RewardModelFunction;
use reward_model::train::{RewardTokenizer, RewardTrainer};
use reward_model::{RobertaConfig, RobertaRegressor};
use rl_algos::rewards::{RewardFunction, WeightedRewards};
use rl_algos::{AlgorithmInputs, Environment, PromptItem};
use serde::{Deserialize, Serialize};
use tasks::{Problem, TaskData};

use crate::common::write_atomically;
use crate::study::config::{Cell, MethodSpec, PolicyBase, RewardModelSpec, SftSpec, Study, TaskSpec, registry};

/// How `compare` runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where `reports/` is.
    pub reports: PathBuf,
    /// Redo finished cells.
    pub force: bool,
    /// Plain log lines instead of progress bars.
    pub quiet: bool,
}

/// What became of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellStatus {
    /// Trained (if it trains) and evaluated: a result.
    #[default]
    Finished,
    /// Stopped by an error (its message in `error`); rerun `compare` to retry it.
    Failed,
    /// Its training diverged (see [`divergence`]; the step and the quantity in `error`): not a
    /// result, left out of the means, the intervals and the charts. A rerun does not retry it
    /// (the same settings diverge again); `--force` does.
    Diverged,
}

/// One cell's results (`cells/<id>/summary.json`, and a row of `summary.csv`).
///
/// The accuracies are absent (not NaN, which JSON writes as `null`) for a cell that failed or
/// diverged: readers such as `cargo xtask plot` then parse every cell and skip those.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellSummary {
    /// Method name.
    pub method: String,
    /// Reward source (`-` for none).
    pub reward_source: String,
    /// Seed.
    pub seed: u64,
    /// Strict accuracy with its 95% Wilson interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_strict: Option<f64>,
    /// Lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_strict_ci_low: Option<f64>,
    /// Upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_strict_ci_high: Option<f64>,
    /// Lenient accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_lenient: Option<f64>,
    /// Lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_lenient_ci_low: Option<f64>,
    /// Upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_lenient_ci_high: Option<f64>,
    /// Held-out problems evaluated.
    pub test_problems: usize,
    /// Training seconds (0 for methods that do not train).
    pub train_seconds: f64,
    /// Steps to convergence of the reward curve (none for methods that do not train).
    pub steps_to_convergence: Option<u64>,
    /// Variance of `update_norm` over steps.
    pub update_norm_variance: Option<f64>,
    /// Mean of `update_norm` over steps.
    #[serde(default)]
    pub update_norm_mean: Option<f64>,
    /// Mean of the training reward over the last quarter of the steps.
    #[serde(default)]
    pub final_reward: Option<f64>,
    /// maj@k accuracy (lenient answers, majority of k samples), when `evaluation.maj_k > 0`.
    #[serde(default)]
    pub accuracy_maj: Option<f64>,
    /// Why the cell failed or diverged.
    pub error: Option<String>,
    /// Finished, failed or diverged (summaries written before this field: finished, or failed
    /// when they carry an error).
    #[serde(default)]
    pub status: CellStatus,
}

impl CellSummary {
    /// The cell's id (`cells/<id>/`).
    pub fn id(&self) -> String {
        Cell { method: self.method.clone(), reward_source: self.reward_source.clone(), seed: self.seed }.id()
    }

    /// A result: finished, with its accuracies. Only these enter means, intervals and charts.
    pub fn is_result(&self) -> bool {
        self.status == CellStatus::Finished && self.error.is_none() && self.accuracy_strict.is_some() && self.accuracy_lenient.is_some()
    }

    /// Failed: an error stopped it (a summary from before `status` was written says so by its error).
    pub fn is_failed(&self) -> bool {
        self.status == CellStatus::Failed || (self.status == CellStatus::Finished && !self.is_result())
    }

    /// Its training diverged.
    pub fn is_diverged(&self) -> bool {
        self.status == CellStatus::Diverged
    }
}

/// A row of `summary.csv`: [`CellSummary`]'s fields in its order, every one present (an absent
/// value is an empty field). The csv crate cannot skip a field, as summary.json does, without
/// misaligning the columns.
#[derive(Serialize)]
struct SummaryCsvRow<'a> {
    method: &'a str,
    reward_source: &'a str,
    seed: u64,
    accuracy_strict: Option<f64>,
    accuracy_strict_ci_low: Option<f64>,
    accuracy_strict_ci_high: Option<f64>,
    accuracy_lenient: Option<f64>,
    accuracy_lenient_ci_low: Option<f64>,
    accuracy_lenient_ci_high: Option<f64>,
    test_problems: usize,
    train_seconds: f64,
    steps_to_convergence: Option<u64>,
    update_norm_variance: Option<f64>,
    update_norm_mean: Option<f64>,
    final_reward: Option<f64>,
    accuracy_maj: Option<f64>,
    error: Option<&'a str>,
    status: CellStatus,
}

impl<'a> From<&'a CellSummary> for SummaryCsvRow<'a> {
    fn from(s: &'a CellSummary) -> Self {
        Self {
            method: &s.method,
            reward_source: &s.reward_source,
            seed: s.seed,
            accuracy_strict: s.accuracy_strict,
            accuracy_strict_ci_low: s.accuracy_strict_ci_low,
            accuracy_strict_ci_high: s.accuracy_strict_ci_high,
            accuracy_lenient: s.accuracy_lenient,
            accuracy_lenient_ci_low: s.accuracy_lenient_ci_low,
            accuracy_lenient_ci_high: s.accuracy_lenient_ci_high,
            test_problems: s.test_problems,
            train_seconds: s.train_seconds,
            steps_to_convergence: s.steps_to_convergence,
            update_norm_variance: s.update_norm_variance,
            update_norm_mean: s.update_norm_mean,
            final_reward: s.final_reward,
            accuracy_maj: s.accuracy_maj,
            error: s.error.as_deref(),
            status: s.status,
        }
    }
}

fn log(quiet: bool, progress: &MultiProgress, message: String) {
    if quiet {
        eprintln!("{message}");
    } else {
        let _ = progress.println(message);
    }
}

/// Runs every unfinished cell of `study`.
pub fn run_study(study: &Study, options: &RunOptions) -> anyhow::Result<Vec<CellSummary>> {
    let dir = options.reports.join(&study.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomically(&dir.join("config.json"), serde_json::to_string_pretty(study)?.as_bytes())?;
    let progress = if options.quiet { MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden()) } else { MultiProgress::new() };
    let device = study.backend.device()?;
    let task = load_task(study)?;
    let base_dir = prepare_base(study, &task, &dir, &device, options, &progress)?;
    let tokenizer = PolicyTokenizer::load_dir(&base_dir).with_context(|| format!("the base policy in {} has no tokenizer", base_dir.display()))?;
    let reward_model = prepare_reward_model(study, &task, &dir, &base_dir, &device, options, &progress)?;
    let matrix = study.matrix();
    let overall = progress.add(ProgressBar::new(matrix.len() as u64));
    overall.set_style(ProgressStyle::with_template("cells {bar:30} {pos}/{len} eta {eta} {msg}")?);
    let mut summaries = Vec::new();
    for cell in &matrix {
        let cell_dir = dir.join("cells").join(cell.id());
        let summary_path = cell_dir.join("summary.json");
        // Finished and diverged cells are skipped on a rerun (the same settings diverge again);
        // failed ones are tried again.
        let earlier = std::fs::read_to_string(&summary_path).ok().and_then(|text| serde_json::from_str::<CellSummary>(&text).ok());
        if let (Some(summary), false) = (earlier.filter(|s| s.is_result() || s.is_diverged()), options.force) {
            let what = if summary.is_diverged() { "diverged earlier" } else { "done earlier" };
            log(options.quiet, &progress, format!("{}: {what}, skipped", cell.id()));
            summaries.push(summary);
            overall.inc(1);
            continue;
        }
        overall.set_message(cell.id());
        std::fs::create_dir_all(&cell_dir)?;
        let started = Instant::now();
        // A failing cell (an error, or a panic deep in a backend) is recorded and the others go on.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_cell(study, cell, &task, &base_dir, &tokenizer, reward_model.as_ref(), &cell_dir, &device, &progress, options.quiet)
        }));
        let summary = match outcome {
            Ok(Ok(summary)) => summary,
            Ok(Err(error)) => {
                log(options.quiet, &progress, format!("{}: failed: {error:#}", cell.id()));
                failed_summary(cell, format!("{error:#}"))
            }
            Err(panic) => {
                let message = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                log(options.quiet, &progress, format!("{}: failed (panic): {message}", cell.id()));
                failed_summary(cell, format!("panic: {message}"))
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let line = match (summary.accuracy_strict, summary.accuracy_lenient) {
            (Some(strict), Some(lenient)) if summary.is_result() => format!("{}: strict {:.1}% lenient {:.1}% ({seconds:.0} s)", cell.id(), strict * 100.0, lenient * 100.0),
            _ if summary.is_diverged() => format!("{}: diverged, not a result: {} ({seconds:.0} s)", cell.id(), summary.error.as_deref().unwrap_or("")),
            _ => format!("{}: failed ({seconds:.0} s)", cell.id()),
        };
        log(options.quiet, &progress, line);
        write_atomically(&summary_path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        summaries.push(summary);
        overall.inc(1);
    }
    overall.finish_and_clear();
    write_reports(&dir, &summaries)?;
    // Charts last: a plotting problem must not cost the results above.
    match crate::plot::render(&dir) {
        Ok(_) => {}
        Err(error) => log(options.quiet, &progress, format!("charts not rendered: {error:#}")),
    }
    write_reports(&dir, &summaries)?;
    Ok(summaries)
}

/// The summary of a cell that is no result: no accuracies (absent, not NaN), the reason in `error`.
fn unfinished_summary(cell: &Cell, status: CellStatus, error: String, train_seconds: f64) -> CellSummary {
    CellSummary {
        method: cell.method.clone(),
        reward_source: cell.reward_source.clone(),
        seed: cell.seed,
        accuracy_strict: None,
        accuracy_strict_ci_low: None,
        accuracy_strict_ci_high: None,
        accuracy_lenient: None,
        accuracy_lenient_ci_low: None,
        accuracy_lenient_ci_high: None,
        test_problems: 0,
        train_seconds,
        steps_to_convergence: None,
        update_norm_variance: None,
        update_norm_mean: None,
        final_reward: None,
        accuracy_maj: None,
        error: Some(error),
        status,
    }
}

fn failed_summary(cell: &Cell, error: String) -> CellSummary {
    unfinished_summary(cell, CellStatus::Failed, error, 0.0)
}

fn load_task(study: &Study) -> anyhow::Result<TaskData> {
    Ok(match &study.task {
        TaskSpec::Synthetic { synthetic } => tasks::synthetic::generate(synthetic)?,
        TaskSpec::Gsm8k { source, options, train_limit } => {
            let mut data = tasks::gsm8k::load(source, *options)?;
            if let Some(limit) = train_limit {
                data.train.problems.truncate(*limit);
            }
            data
        }
    })
}

/// The prompt builder of a cell: the template, k exemplars from train, the chat template when asked.
fn prompt_builder(study: &Study, task: &TaskData, base_dir: &Path, k: usize, seed: u64) -> anyhow::Result<PromptBuilder> {
    let mut builder = PromptBuilder::new(study.policy.template).with_exemplars(sample_exemplars(&task.train, k, seed)?);
    if study.policy.chat_template {
        let chat = prompting::ChatTemplate::from_dir(base_dir)?;
        builder = builder.with_chat_template(chat, serde_json::Map::new());
    }
    Ok(builder)
}

/// Keeps the last `limit` tokens of a prompt (the question is at the end; exemplars go first),
/// and its first token when that is the beginning-of-sequence token `bos` the tokenizer puts
/// in front: every training sequence starts with it, and a prompt cut without it reads as
/// nothing the model has seen.
fn fit(mut ids: Vec<i64>, limit: usize, bos: Option<i64>) -> Vec<i64> {
    if ids.len() > limit {
        let keep_first = bos.is_some() && ids.first().copied() == bos && limit > 1;
        let start = usize::from(keep_first);
        ids.drain(start..start + ids.len() - limit);
    }
    ids
}

/// Token ids of `text`; with `add_special_tokens`, as transformers' `tokenizer(text)` gives them:
/// the tokenizer decides whether a BOS goes first (Llama 3's does; GPT-2's, Qwen2's and
/// SmolLM2's do not), never the model's config.
fn encode(tokenizer: &PolicyTokenizer, text: &str, add_special_tokens: bool) -> anyhow::Result<Vec<i64>> {
    Ok(tokenizer.encode(text, add_special_tokens)?.into_iter().map(i64::from).collect())
}

/// Token ids of a prompt `builder` rendered. Text a chat template rendered already holds what the
/// template puts in and is encoded without special tokens, as TRL does; a plain-text prompt gets
/// what the tokenizer adds (TRL adds nothing there either: a Llama 3 base model then reads its
/// prompts without `<|begin_of_text|>`, which cotlab keeps, as transformers' `generate` users do).
fn encode_prompt(tokenizer: &PolicyTokenizer, builder: &PromptBuilder, text: &str) -> anyhow::Result<Vec<i64>> {
    encode(tokenizer, text, !builder.uses_chat_template())
}

/// A base saved before its tokenizer carried the BOS template was trained on sequences that
/// start with its BOS all the same (its config then decided): writes the template into its
/// tokenizer.json, so its prompts keep starting with it.
fn add_missing_bos_template(base_dir: &Path) -> anyhow::Result<()> {
    let tokenizer = PolicyTokenizer::load_dir(base_dir)?;
    if let (None, Some(bos)) = (tokenizer.prepended_bos(), tokenizer.bos_id) {
        tokenizer.prepending_bos(bos)?.save(&base_dir.join("tokenizer.json"))?;
    }
    Ok(())
}

/// Each `#### N` line of `text` stays with probability `keep`, else becomes `The answer is N.`
/// (see `SftSpec::answer_marker_fraction`).
fn vary_answer_endings(text: &str, keep: f64, rng: &mut ChaCha8Rng) -> String {
    if keep >= 1.0 {
        return text.to_string();
    }
    text.split_inclusive('\n')
        .map(|line| match line.strip_prefix("#### ") {
            Some(rest) if !rng.random_bool(keep) => {
                let (answer, newline) = rest.split_at(rest.trim_end_matches('\n').len());
                format!("The answer is {answer}.{newline}")
            }
            _ => line.to_string(),
        })
        .collect()
}

/// The supervised base's training examples: packed documents of worked problems (every token
/// trained), or one problem per example with the prompt masked.
fn sft_examples(study: &Study, task: &TaskData, sft: &SftSpec, tokenizer: &PolicyTokenizer) -> anyhow::Result<Vec<SftExample>> {
    let eos = tokenizer.eos_ids[0];
    let template = study.policy.template;
    let train_count = ((task.train.len() as f64) * sft.data_fraction).round().max(1.0) as usize;
    let pool = &task.train.problems[..train_count.min(task.train.len())];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut examples = Vec::new();
    if sft.problems_per_document > 0 {
        // Documents of 1..=n worked problems, each closed by the end-of-sequence token, packed
        // whole into sequences of at most max_length tokens (nanoGPT-style packing: no padding
        // is trained or computed). Every token after a sequence's first is trained. Enough
        // sequences that no batch repeats one.
        let sequences = (sft.steps as usize).saturating_mul(sft.batch_size).max(1);
        let mut current: Vec<i64> = Vec::new();
        while examples.len() < sequences {
            let count = rng.random_range(1..=sft.problems_per_document);
            let picks: Vec<Problem> = (0..count).map(|_| pool[rng.random_range(0..pool.len())].clone()).collect();
            let (last, context) = picks.split_last().expect("at least one problem");
            let builder = PromptBuilder::new(template).with_exemplars(context.to_vec());
            let text = format!("{}{}", builder.render(&last.question)?, builder.target(last));
            let mut document = encode(tokenizer, &vary_answer_endings(&text, sft.answer_marker_fraction, &mut rng), true)?;
            document.push(i64::from(eos));
            document.truncate(study.policy.max_length);
            if current.len() + document.len() > study.policy.max_length && current.len() > 1 {
                let completion_ids = current.split_off(1);
                examples.push(SftExample { prompt_ids: std::mem::take(&mut current), completion_ids });
            }
            current.extend(document);
        }
    } else {
        for problem in pool {
            // Some examples carry 1-2 exemplars, so few-shot prompts are a natural continuation.
            let k = rng.random_range(0..=2usize);
            let exemplars = sample_exemplars(&task.train, k, rng.random())?;
            let builder = PromptBuilder::new(template).with_exemplars(exemplars);
            let prompt_ids = encode(tokenizer, &builder.render(&problem.question)?, true)?;
            // The completion continues the prompt: no BOS of its own.
            let mut completion_ids = encode(tokenizer, &vary_answer_endings(&builder.target(problem), sft.answer_marker_fraction, &mut rng), false)?;
            completion_ids.push(i64::from(eos));
            // Cut from the front, keeping the BOS, as every prompt is.
            let room = study.policy.max_length.saturating_sub(completion_ids.len());
            let prompt_ids = fit(prompt_ids, room, tokenizer.prepended_bos().map(i64::from));
            completion_ids.truncate(study.policy.max_length - prompt_ids.len().min(study.policy.max_length - 1));
            examples.push(SftExample { prompt_ids, completion_ids });
        }
    }
    Ok(examples)
}

/// Trains (or locates) the base policy; returns its checkpoint directory.
fn prepare_base(study: &Study, task: &TaskData, dir: &Path, device: &Device, options: &RunOptions, progress: &MultiProgress) -> anyhow::Result<PathBuf> {
    let (preset, vocab_size, sft) = match &study.policy.base {
        PolicyBase::Checkpoint { model } => return Ok(ModelSource::parse(model)?.resolve()?),
        PolicyBase::Preset { preset, vocab_size, sft } => (*preset, *vocab_size, sft),
    };
    let base_dir = dir.join("base");
    if base_dir.join("model.safetensors").is_file() && !options.force {
        log(options.quiet, progress, format!("base policy: {} (trained earlier)", base_dir.display()));
        add_missing_bos_template(&base_dir)?;
        return Ok(base_dir);
    }
    let template = study.policy.template;
    let mut corpus_rng = ChaCha8Rng::seed_from_u64(1);
    let corpus = task.train.problems.iter().map(|p| {
        let builder = PromptBuilder::new(template);
        let text = format!("{}{}", builder.render(&p.question).unwrap_or_default(), builder.target(p));
        vary_answer_endings(&text, sft.answer_marker_fraction, &mut corpus_rng)
    });
    let tokenizer = train_tokenizer(corpus.collect::<Vec<_>>().into_iter(), vocab_size)?;
    let eos = tokenizer.eos_ids[0];
    // GPT-Neo's convention, bos = eos, put in front of every sequence by the tokenizer's own
    // template: training and every later prompt (in cotlab or transformers) start alike, and a
    // model that sees a fixed first token answers better at position 0.
    let tokenizer = tokenizer.prepending_bos(eos)?;
    let pad = i64::from(tokenizer.pad_id.unwrap_or(eos));
    let examples = sft_examples(study, task, sft, &tokenizer)?;
    let autodiff = device.clone().autodiff();
    autodiff.seed(0);
    let model = CausalLm::init(&preset.config(tokenizer.vocab_size(), eos, study.policy.max_length), &autodiff).map_err(anyhow::Error::msg)?;
    let config = SftConfig {
        steps: sft.steps,
        batch_size: sft.batch_size,
        schedule: Schedule { learning_rate: sft.learning_rate, warmup_steps: sft.steps / 20, total_steps: sft.steps, min_lr_ratio: 0.1 },
        adamw: AdamWSettings::default(),
        max_grad_norm: Some(1.0),
        checkpoint_every: 0,
        seed: 0,
        pad_token_id: pad,
    };
    let bar = progress.add(ProgressBar::new(sft.steps));
    bar.set_style(ProgressStyle::with_template("base policy (supervised) {bar:30} {pos}/{len} {msg} eta {eta}")?);
    let mut trainer = SftTrainer::new(model, config);
    let started = Instant::now();
    let history = trainer.run(&examples, None, None, |step| {
        bar.set_message(format!("loss {:.3}", step.loss));
        bar.inc(1);
        if options.quiet && (step.step % 50 == 0 || step.step == sft.steps) {
            eprintln!("base policy: step {}/{} loss {:.3} ({:.0} s)", step.step, sft.steps, step.loss, started.elapsed().as_secs_f64());
        }
    })?;
    bar.finish_and_clear();
    let last = history.last().map_or(f64::NAN, |s| s.loss);
    log(options.quiet, progress, format!("base policy: {} supervised steps, final loss {last:.3}", history.len()));
    trainer.model().save_dir(&base_dir, Some(&tokenizer))?;
    // What the cells will read must encode prompts exactly as training did.
    let reloaded = PolicyTokenizer::load_dir(&base_dir)?;
    let probe = PromptBuilder::new(template).render(&task.test.problems[0].question)?;
    if encode(&reloaded, &probe, true)? != encode(&tokenizer, &probe, true)? {
        bail!("the saved base in {} encodes prompts differently from its training (BOS/EOS settings); this is a bug in cotlab", base_dir.display());
    }
    Ok(base_dir)
}

/// Comparisons as the policy's rollouts present them to the reward model: the prompt the
/// policy is given (zero-shot) and the completion it writes after it.
fn as_rollouts(pairs: Vec<Comparison>, builder: &PromptBuilder) -> anyhow::Result<Vec<Comparison>> {
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
/// (config.json, model.safetensors, tokenizer.json).
fn prepare_reward_model(
    study: &Study,
    task: &TaskData,
    dir: &Path,
    base_dir: &Path,
    device: &Device,
    options: &RunOptions,
    progress: &MultiProgress,
) -> anyhow::Result<Option<PathBuf>> {
    let needed = study.reward_sources.values().any(|source| source.reward_model_weight.is_some());
    let Some(spec) = study.reward_model.as_ref().filter(|_| needed) else { return Ok(None) };
    let (checkpoint, training) = match spec {
        RewardModelSpec::Checkpoint { model, fine_tune: None } => return Ok(Some(ModelSource::parse(model)?.resolve()?)),
        RewardModelSpec::Checkpoint { model, fine_tune: Some(training) } => (Some(ModelSource::parse(model)?.resolve()?), training),
        RewardModelSpec::Train { training, .. } => (None, training),
    };
    let rm_dir = dir.join("reward_model");
    if rm_dir.join("model.safetensors").is_file() && rm_dir.join("metrics.json").is_file() && !options.force {
        log(options.quiet, progress, format!("reward model: {} (trained earlier)", rm_dir.display()));
        return Ok(Some(rm_dir));
    }
    let autodiff = device.clone().autodiff();
    autodiff.seed(training.seed);
    let (tokenizer, model) = match (&checkpoint, spec) {
        (Some(checkpoint), _) => {
            let tokenizer = PolicyTokenizer::load_dir(checkpoint).with_context(|| format!("the reward model in {} has no tokenizer", checkpoint.display()))?;
            let (model, head) = RobertaRegressor::load_dir(checkpoint, &autodiff)?;
            log(options.quiet, progress, format!("reward model: fine-tuning {} (regression head {head:?})", checkpoint.display()));
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
    let bar = progress.add(ProgressBar::new(training.steps));
    bar.set_style(ProgressStyle::with_template("reward model {bar:30} {pos}/{len} {msg} eta {eta}")?);
    let started = Instant::now();
    let mut trainer = RewardTrainer::new(model, training.clone());
    let mut final_loss = f64::NAN;
    for _ in 0..training.steps {
        let step = trainer.train_step(&train, &reward_tokenizer)?;
        final_loss = step.loss;
        bar.set_message(format!("loss {:.3} acc {:.2}", step.loss, step.accuracy));
        bar.inc(1);
    }
    bar.finish_and_clear();
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
    trainer.into_model().without_token_head().save_dir(&rm_dir)?;
    tokenizer.save(&rm_dir.join("tokenizer.json"))?;
    // metrics.json last: its presence marks a finished reward model.
    write_atomically(&rm_dir.join("metrics.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    log(
        options.quiet,
        progress,
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

/// The policy an RL cell trains: the base on `autodiff`, with the study's LoRA adapters when
/// `policy.lora` names them (their A factors drawn from the device generator seeded with the
/// cell's seed), so that only the adapters train.
fn training_policy(study: &Study, base_dir: &Path, autodiff: &Device, seed: u64) -> anyhow::Result<CausalLm> {
    let policy = CausalLm::load_dir(base_dir, autodiff)?;
    let Some(lora) = &study.policy.lora else { return Ok(policy) };
    autodiff.seed(seed);
    policy.with_lora(lora).map_err(|error| anyhow::anyhow!("policy.lora: {error}"))
}

/// The base checkpoint as PEFT's `base_model_name_or_path`: the hub id, or the directory (for a
/// GGUF file, its converted directory, which transformers loads as it is).
fn base_model_name(study: &Study, base_dir: &Path) -> String {
    if let PolicyBase::Checkpoint { model } = &study.policy.base
        && let Ok(ModelSource::Hub { repo, .. }) = ModelSource::parse(model)
    {
        return repo;
    }
    std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf()).display().to_string()
}

/// The reward model of `rm_dir` as a reward function.
fn load_reward_function(rm_dir: &Path, device: &Device, normalize: bool) -> anyhow::Result<RewardModelFunction> {
    let (model, _) = RobertaRegressor::load_dir(rm_dir, device)?;
    let tokenizer = PolicyTokenizer::load_dir(rm_dir).with_context(|| format!("the reward model in {} has no tokenizer", rm_dir.display()))?;
    let reward_tokenizer = RewardTokenizer::new(tokenizer, model.config().max_tokens());
    Ok(RewardModelFunction::new(&model, reward_tokenizer, 32, normalize))
}

#[allow(clippy::too_many_arguments, reason = "the cell's whole context")]
fn run_cell(
    study: &Study,
    cell: &Cell,
    task: &TaskData,
    base_dir: &Path,
    tokenizer: &PolicyTokenizer,
    reward_model: Option<&PathBuf>,
    cell_dir: &Path,
    device: &Device,
    progress: &MultiProgress,
    quiet: bool,
) -> anyhow::Result<CellSummary> {
    let method = &study.methods[&cell.method];
    let test: &[Problem] = &task.test.problems[..study.evaluation.test_size.min(task.test.len())];
    let sample_questions = &test[..study.evaluation.samples.min(test.len())];
    let mut samples_before = Vec::new();
    // Written as the steps come, so the rows of a cell that diverges or crashes stay on disk.
    let mut metrics_file = MetricsFile::create(cell, cell_dir)?;
    let (policy, k, train_seconds, metrics) = match method {
        MethodSpec::FewShot { k } => (CausalLm::load_dir(base_dir, device)?, *k, 0.0, Vec::new()),
        MethodSpec::Base => (CausalLm::load_dir(base_dir, device)?, 0, 0.0, Vec::new()),
        MethodSpec::Rl { algorithm, steps, prompts_per_step, few_shot_k, config, .. } => {
            let source = &study.reward_sources[&cell.reward_source];
            let mut functions: Vec<(Box<dyn RewardFunction>, f32)> =
                source.rules.iter().map(|rule| (Box::new(rule.kind) as Box<dyn RewardFunction>, rule.weight)).collect();
            if let Some(weight) = source.reward_model_weight {
                let rm_dir = reward_model.with_context(|| format!("reward source {} needs the reward model, which was not prepared", cell.reward_source))?;
                functions.push((Box::new(load_reward_function(rm_dir, device, source.normalize_reward_model)?), weight));
            }
            let rewards = WeightedRewards::new(functions);
            let autodiff = device.clone().autodiff();
            let entry = registry().iter().find(|entry| entry.name == algorithm).context("algorithm not registered")?;
            let optim = study.rl_optim(&cell.method, registry())?;
            let inputs = AlgorithmInputs { policy: training_policy(study, base_dir, &autodiff, cell.seed)?, config: config.clone(), optim, seed: cell.seed };
            let mut algorithm = (entry.build)(inputs)?;
            // The scale an update is judged against (see `divergence`).
            let weight_norm = parameter_norm(algorithm.policy());
            let builder = prompt_builder(study, task, base_dir, *few_shot_k, cell.seed)?;
            // What the policy wrote before training, for samples.jsonl.
            samples_before = evaluate(study, &algorithm.policy().valid(), tokenizer, &builder, sample_questions)?.samples;
            let decode = |ids: &[i64]| tokenizer.decode(&ids.iter().map(|&id| id as u32).collect::<Vec<_>>(), true).unwrap_or_default();
            let environment = Environment {
                decode: &decode,
                eos_token_ids: tokenizer.eos_ids.iter().map(|&id| i64::from(id)).collect(),
                pad_token_id: tokenizer.pad_id.map_or(0, i64::from),
                stop_strings: study.policy.template.stop_sequences().iter().map(|s| s.to_string()).collect(),
                rewards: &rewards,
            };
            let bar = progress.add(ProgressBar::new(*steps));
            bar.set_style(ProgressStyle::with_template("  {prefix:30} {bar:30} {pos}/{len} {msg} eta {eta}")?);
            bar.set_prefix(cell.id());
            let started = Instant::now();
            let mut rng = ChaCha8Rng::seed_from_u64(cell.seed);
            let completion_limit = config.get("max_completion_length").and_then(|v| v.as_u64()).unwrap_or(128) as usize;
            let rl_prompt_limit = study.policy.max_length.saturating_sub(completion_limit).max(8);
            let eval_every = study.evaluation.eval_every;
            let eval_problems = &test[..study.evaluation.train_eval_size.min(test.len())];
            let mut history = Vec::new();
            let mut eval_seconds = 0.0;
            if eval_every > 0 {
                // Step 0: the held-out accuracy the training starts from, so curves begin at the base.
                let eval_started = Instant::now();
                let before = evaluate(study, &algorithm.policy().valid(), tokenizer, &builder, eval_problems)?;
                let mut row = rl_algos::Metrics::new();
                row.insert("step".to_string(), 0.0);
                row.insert("eval/accuracy_lenient".to_string(), before.accuracy.lenient.accuracy);
                row.insert("eval/accuracy_strict".to_string(), before.accuracy.strict.accuracy);
                metrics_file.push(&row)?;
                history.push(row);
                eval_seconds += eval_started.elapsed().as_secs_f64();
            }
            for step in 1..=*steps {
                let prompts: Vec<PromptItem> = (0..*prompts_per_step)
                    .map(|_| {
                        let problem = &task.train.problems[rng.random_range(0..task.train.len())];
                        let text = builder.render(&problem.question)?;
                        let prompt_ids = fit(encode_prompt(tokenizer, &builder, &text)?, rl_prompt_limit, tokenizer.prepended_bos().map(i64::from));
                        Ok(PromptItem { prompt_ids, prompt_text: text, answer: problem.answer.clone() })
                    })
                    .collect::<anyhow::Result<_>>()?;
                let mut row = match algorithm.train_step(&prompts, &environment) {
                    Ok(row) => row,
                    // The algorithm names the step itself; a NaN or infinite loss or gradient
                    // norm is divergence, not a failure of the study.
                    Err(rl_algos::RlError::NotFinite { step, quantity, value }) => {
                        bar.finish_and_clear();
                        let reason = format!(
                            "step {step}: the {quantity} is {value}; lower methods.{}.optim.learning_rate or set its max_grad_norm",
                            cell.method
                        );
                        return Ok(unfinished_summary(cell, CellStatus::Diverged, reason, started.elapsed().as_secs_f64() - eval_seconds));
                    }
                    Err(error) => return Err(anyhow::Error::new(error).context(format!("step {step}"))),
                };
                row.insert("step".to_string(), step as f64);
                if let Some(why) = divergence(&row, weight_norm) {
                    // The row that shows it is kept; the model is not evaluated (it is no result).
                    metrics_file.push(&row)?;
                    bar.finish_and_clear();
                    // Clipping bounds the gradient, not AdamW's step (about the learning rate per
                    // weight): the learning rate is the fix.
                    let reason = format!("step {step}: {why}; lower methods.{}.optim.learning_rate", cell.method);
                    return Ok(unfinished_summary(cell, CellStatus::Diverged, reason, started.elapsed().as_secs_f64() - eval_seconds));
                }
                if eval_every > 0 && (step % eval_every == 0 || step == *steps) {
                    // Held-out accuracy during training (not counted as training time).
                    let eval_started = Instant::now();
                    let during = evaluate(study, &algorithm.policy().valid(), tokenizer, &builder, eval_problems)?;
                    row.insert("eval/accuracy_lenient".to_string(), during.accuracy.lenient.accuracy);
                    row.insert("eval/accuracy_strict".to_string(), during.accuracy.strict.accuracy);
                    eval_seconds += eval_started.elapsed().as_secs_f64();
                }
                let reward = row.get("reward").copied().unwrap_or(f64::NAN);
                if quiet && (step % 10 == 0 || step == *steps) {
                    eprintln!("{}: step {step}/{steps} reward {reward:.3}", cell.id());
                }
                bar.set_message(format!("reward {reward:.3}"));
                metrics_file.push(&row)?;
                history.push(row);
                bar.inc(1);
            }
            bar.finish_and_clear();
            let seconds = started.elapsed().as_secs_f64() - eval_seconds;
            let trained = algorithm.into_policy().valid();
            if study.policy.lora.is_some() {
                // The trained policy of a LoRA cell, small enough to keep: PEFT loads it over the base.
                trained.save_adapters(&cell_dir.join(policy_models::lora::ADAPTER_SUBDIR), Some(&base_model_name(study, base_dir)))?;
            }
            (trained, *few_shot_k, seconds, history)
        }
    };
    let builder = prompt_builder(study, task, base_dir, k, cell.seed)?;
    let evaluation = evaluate(study, &policy, tokenizer, &builder, test)?;
    let accuracy_maj = if study.evaluation.maj_k > 0 { Some(majority_accuracy(study, &policy, tokenizer, &builder, test, cell.seed)?) } else { None };
    let mut lines = String::new();
    for (stage, sample) in samples_before.iter().map(|s| ("before", s)).chain(evaluation.samples.iter().take(sample_questions.len()).map(|s| ("after", s))) {
        let mut value = serde_json::to_value(sample)?;
        value["stage"] = serde_json::Value::from(stage);
        lines.push_str(&serde_json::to_string(&value)?);
        lines.push('\n');
    }
    write_atomically(&cell_dir.join("samples.jsonl"), lines.as_bytes())?;
    // Training steps only (the step-0 row holds the held-out accuracy before training).
    let trained: Vec<&rl_algos::Metrics> = metrics.iter().filter(|m| m.get("step").is_none_or(|step| *step >= 1.0)).collect();
    let rewards: Vec<f64> = trained.iter().map(|m| m.get("reward").copied().unwrap_or(f64::NAN)).collect();
    let steps: Vec<u64> = trained.iter().enumerate().map(|(index, m)| m.get("step").map_or(index as u64 + 1, |step| *step as u64)).collect();
    let update_norms: Vec<f64> = metrics.iter().filter_map(|m| m.get("update_norm").copied()).collect();
    let tail = &rewards[rewards.len() - rewards.len().div_ceil(4)..];
    let summary = evaluation.accuracy;
    Ok(CellSummary {
        method: cell.method.clone(),
        reward_source: cell.reward_source.clone(),
        seed: cell.seed,
        accuracy_strict: Some(summary.strict.accuracy),
        accuracy_strict_ci_low: Some(summary.strict.ci_low),
        accuracy_strict_ci_high: Some(summary.strict.ci_high),
        accuracy_lenient: Some(summary.lenient.accuracy),
        accuracy_lenient_ci_low: Some(summary.lenient.ci_low),
        accuracy_lenient_ci_high: Some(summary.lenient.ci_high),
        test_problems: summary.strict.n,
        train_seconds,
        steps_to_convergence: eval::stats::steps_to_convergence(&steps, &rewards, 0.6, 0.9),
        update_norm_variance: (!update_norms.is_empty()).then(|| eval::stats::sample_variance(&update_norms)),
        update_norm_mean: (!update_norms.is_empty()).then(|| eval::stats::mean_std(&update_norms).mean),
        final_reward: (!tail.is_empty()).then(|| eval::stats::mean_std(tail).mean),
        accuracy_maj,
        error: None,
        status: CellStatus::Finished,
    })
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    question: String,
    answer: String,
    completion: String,
    strict: bool,
    lenient: bool,
}

/// Longest prompt that leaves room for the answer within the model's positions.
fn prompt_limit(study: &Study, policy: &CausalLm) -> usize {
    let positions = policy.config().max_positions().unwrap_or(usize::MAX);
    positions.min(study.policy.max_length).saturating_sub(study.evaluation.max_new_tokens).max(8)
}

struct Evaluation {
    accuracy: AccuracySummary,
    samples: Vec<Sample>,
}

/// Completions of `policy` for `problems` with `sampler`, cut at the template's stop strings.
fn complete(study: &Study, policy: &CausalLm, tokenizer: &PolicyTokenizer, builder: &PromptBuilder, problems: &[Problem], sampler: Sampler, seed: u64) -> anyhow::Result<Vec<String>> {
    let stops: Vec<String> = study.policy.template.stop_sequences().iter().map(|s| s.to_string()).collect();
    let decode = |ids: &[i64]| tokenizer.decode(&ids.iter().map(|&id| id as u32).collect::<Vec<_>>(), true).unwrap_or_default();
    let config = GenerationConfig {
        max_new_tokens: study.evaluation.max_new_tokens,
        sampler,
        eos_token_ids: tokenizer.eos_ids.iter().map(|&id| i64::from(id)).collect(),
        pad_token_id: tokenizer.pad_id.map_or(0, i64::from),
        seed,
    };
    let limit = prompt_limit(study, policy);
    let mut completions = Vec::with_capacity(problems.len());
    for chunk in problems.chunks(study.evaluation.batch_size.max(1)) {
        let bos = tokenizer.prepended_bos().map(i64::from);
        let prompts: Vec<Vec<i64>> = chunk.iter().map(|p| Ok(fit(encode_prompt(tokenizer, builder, &builder.render(&p.question)?)?, limit, bos))).collect::<anyhow::Result<_>>()?;
        let generation = generate(policy, &prompts, &config, &stops, Some(&decode));
        for (ids, mask) in generation.completion_ids.iter().zip(&generation.completion_mask) {
            let kept: Vec<i64> = ids.iter().zip(mask).filter(|(_, m)| **m).map(|(id, _)| *id).collect();
            let mut completion = decode(&kept);
            // Cut at a stop string, as a user of the completion would.
            if let Some(cut) = stops.iter().filter_map(|stop| completion.find(stop.as_str())).min() {
                completion.truncate(cut);
            }
            completions.push(completion);
        }
    }
    Ok(completions)
}

/// Greedy answers to the held-out problems, scored.
fn evaluate(study: &Study, policy: &CausalLm, tokenizer: &PolicyTokenizer, builder: &PromptBuilder, test: &[Problem]) -> anyhow::Result<Evaluation> {
    let format = study.policy.template.answer_format();
    let completions = complete(study, policy, tokenizer, builder, test, Sampler::Greedy, 0)?;
    let mut scores = Vec::with_capacity(test.len());
    let mut samples = Vec::with_capacity(test.len());
    for (problem, completion) in test.iter().zip(completions) {
        let score = score_completion(&completion, &problem.answer, format);
        samples.push(Sample { question: problem.question.clone(), answer: problem.answer.clone(), completion, strict: score.strict, lenient: score.lenient });
        scores.push(score);
    }
    Ok(Evaluation { accuracy: AccuracySummary::from_scores(&scores), samples })
}

/// maj@k: `maj_k` sampled completions per problem, the most common lenient answer wins.
fn majority_accuracy(study: &Study, policy: &CausalLm, tokenizer: &PolicyTokenizer, builder: &PromptBuilder, test: &[Problem], seed: u64) -> anyhow::Result<f64> {
    let format = study.policy.template.answer_format();
    let sampler = Sampler::Sample { temperature: study.evaluation.maj_temperature, top_k: None, top_p: None };
    let mut answers: Vec<Vec<Option<String>>> = vec![Vec::new(); test.len()];
    for draw in 0..study.evaluation.maj_k {
        let completions = complete(study, policy, tokenizer, builder, test, sampler, seed.wrapping_mul(1000).wrapping_add(draw as u64 + 1))?;
        for (slot, completion) in answers.iter_mut().zip(completions) {
            slot.push(eval::extract::lenient(&completion, format).as_deref().and_then(tasks::normalize_number));
        }
    }
    let correct = test
        .iter()
        .zip(&answers)
        .filter(|(problem, votes)| eval::stats::majority_answer(votes.iter().map(Option::as_deref)) == Some(problem.answer.as_str()))
        .count();
    Ok(correct as f64 / test.len().max(1) as f64)
}

/// Past this ratio of a step's `update_norm` (the L2 norm of the parameter change) to the L2 norm
/// of the policy's weights before training, the cell has diverged: one step moved the weights by
/// more than their whole size. Healthy fine-tuning moves them by a small fraction per step
/// (AdamW moves each weight by about the learning rate, 1e-4 in the default study, against
/// weights of order 1e-2 to 1); a learning rate of 1e3 moves them by thousands of times their
/// norm at the first step (weight decay alone scales them by 1 - 1e3 x 0.01 = -9).
pub const DIVERGENCE_UPDATE_RATIO: f64 = 1.0;

/// Why a training step's metrics show divergence, if they do: a loss, gradient norm or update
/// norm that is NaN or infinite, or an update larger than [`DIVERGENCE_UPDATE_RATIO`] times
/// `weight_norm`, the policy's weight norm before training.
fn divergence(row: &rl_algos::Metrics, weight_norm: f64) -> Option<String> {
    let watched = |name: &str| name == "loss" || name.starts_with("loss/") || name == "grad_norm" || name == "update_norm";
    if let Some((name, value)) = row.iter().find(|(name, value)| watched(name) && !value.is_finite()) {
        return Some(format!("{name} is {value}"));
    }
    let update = row.get("update_norm").copied()?;
    (update > DIVERGENCE_UPDATE_RATIO * weight_norm).then(|| {
        format!("update_norm {update:.4e} exceeds {DIVERGENCE_UPDATE_RATIO} x the norm of the policy's weights before training ({weight_norm:.4e})")
    })
}

/// L2 norm of every float parameter of `model` (trained or frozen, so a LoRA cell is judged
/// against the whole model's size, not its zero-initialised adapters).
fn parameter_norm(model: &CausalLm) -> f64 {
    struct SquaredNorm(f64);
    impl burn::module::ModuleVisitor for SquaredNorm {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
            self.0 += f64::from(param.val().detach().square().sum().into_scalar::<f32>());
        }
    }
    let mut visitor = SquaredNorm(0.0);
    model.visit(&mut visitor);
    visitor.0.sqrt()
}

/// `cells/<id>/metrics.csv`, one row per step, written as the steps come: a row is appended and
/// flushed at once, so a cell that diverges or crashes keeps the rows before. The columns (the
/// algorithm's metric names, sorted) are known only as rows arrive: a row with a new column
/// rewrites the file (atomically) under the wider header, which happens at the first steps only.
/// The finished file is the same as one written at the end.
struct MetricsFile {
    path: PathBuf,
    cell: Cell,
    columns: std::collections::BTreeSet<String>,
    rows: Vec<rl_algos::Metrics>,
}

impl MetricsFile {
    /// Starts the file with the fixed columns only (what a method that does not train keeps).
    fn create(cell: &Cell, cell_dir: &Path) -> anyhow::Result<Self> {
        let file = Self { path: cell_dir.join("metrics.csv"), cell: cell.clone(), columns: Default::default(), rows: Vec::new() };
        file.rewrite()?;
        Ok(file)
    }

    fn header(&self) -> Vec<String> {
        ["method", "reward_source", "seed", "step"].iter().map(|s| s.to_string()).chain(self.columns.iter().cloned()).collect()
    }

    fn record(&self, index: usize, row: &rl_algos::Metrics) -> Vec<String> {
        // Rows name their step (0: the evaluation before training); otherwise they count from 1.
        let step = row.get("step").map_or(index as u64 + 1, |step| *step as u64);
        let mut record = vec![self.cell.method.clone(), self.cell.reward_source.clone(), self.cell.seed.to_string(), step.to_string()];
        record.extend(self.columns.iter().map(|column| row.get(column).map_or(String::new(), |v| v.to_string())));
        record
    }

    fn rewrite(&self) -> anyhow::Result<()> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.write_record(self.header())?;
        for (index, row) in self.rows.iter().enumerate() {
            writer.write_record(self.record(index, row))?;
        }
        write_atomically(&self.path, &writer.into_inner()?)
    }

    fn push(&mut self, row: &rl_algos::Metrics) -> anyhow::Result<()> {
        let before = self.columns.len();
        self.columns.extend(row.keys().filter(|key| *key != "step").cloned());
        self.rows.push(row.clone());
        if self.columns.len() != before {
            return self.rewrite();
        }
        let file = std::fs::OpenOptions::new().append(true).open(&self.path).with_context(|| format!("cannot append to {}", self.path.display()))?;
        let mut writer = csv::Writer::from_writer(file);
        writer.write_record(self.record(self.rows.len() - 1, row))?;
        writer.flush().with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(())
    }
}

/// `summary.csv`, `summary.json`, `metrics.csv` and `report.md` over all cells.
fn write_reports(dir: &Path, summaries: &[CellSummary]) -> anyhow::Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for summary in summaries {
        writer.serialize(SummaryCsvRow::from(summary))?;
    }
    write_atomically(&dir.join("summary.csv"), &writer.into_inner()?)?;
    write_combined_metrics(dir, summaries)?;
    write_atomically(&dir.join("summary.json"), serde_json::to_string_pretty(summaries)?.as_bytes())?;
    write_atomically(&dir.join("report.md"), report_markdown(dir, summaries).as_bytes())
}

/// The study's `metrics.csv`: every finished cell's rows (one per training step) in one file,
/// under the union of the cells' columns (a column a cell does not report is empty in its rows).
/// Failed and diverged cells keep their rows in their own `cells/<id>/metrics.csv` only.
fn write_combined_metrics(dir: &Path, summaries: &[CellSummary]) -> anyhow::Result<()> {
    let fixed = ["method", "reward_source", "seed", "step"];
    let mut columns: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut tables = Vec::new();
    for summary in summaries.iter().filter(|s| s.is_result()) {
        let path = dir.join("cells").join(summary.id()).join("metrics.csv");
        if !path.is_file() {
            continue;
        }
        let mut reader = csv::Reader::from_path(&path).with_context(|| format!("reading {}", path.display()))?;
        let header: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
        let rows: Vec<csv::StringRecord> = reader.records().collect::<Result<_, _>>().with_context(|| format!("reading {}", path.display()))?;
        columns.extend(header.iter().filter(|name| !fixed.contains(&name.as_str())).cloned());
        tables.push((header, rows));
    }
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(fixed.iter().map(|name| name.to_string()).chain(columns.iter().cloned()))?;
    for (header, rows) in &tables {
        for row in rows {
            let value = |name: &str| header.iter().position(|h| h == name).and_then(|i| row.get(i)).unwrap_or("").to_string();
            writer.write_record(fixed.iter().map(|name| value(name)).chain(columns.iter().map(|name| value(name))))?;
        }
    }
    write_atomically(&dir.join("metrics.csv"), &writer.into_inner()?)
}

/// `report.md`: per (method, reward source), the mean over seeds with its 95% interval (the
/// wider of the across-seed t interval and the test-set Wilson interval, as the charts draw),
/// training cost and stability, then the reward model, the charts and the cells that are no
/// result (diverged, failed), which count in neither the means nor the intervals.
pub fn report_markdown(dir: &Path, summaries: &[CellSummary]) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let mut report = format!("# Study `{name}`\n\n");
    report.push_str("Accuracy on held-out problems (greedy decoding): mean over seeds, 95% CI in brackets (the wider of the across-seed Student-t interval and the test-set Wilson interval). Strict reads only the template's official answer format; lenient takes the last number.\n\n");
    report.push_str("| method | reward source | seeds | lenient accuracy | strict accuracy | maj@k | final reward | train s | steps to convergence | update_norm mean (var) |\n|---|---|---|---|---|---|---|---|---|---|\n");
    let mut groups: Vec<(String, String)> = Vec::new();
    for summary in summaries {
        let key = (summary.method.clone(), summary.reward_source.clone());
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    let fmt_opt = |values: Vec<f64>, digits: usize| if values.is_empty() { "-".to_string() } else { format!("{:.*}", digits, eval::stats::mean_std(&values).mean) };
    for (method, source) in &groups {
        let group: Vec<&CellSummary> = summaries.iter().filter(|s| &s.method == method && &s.reward_source == source).collect();
        let cells: Vec<&CellSummary> = group.iter().copied().filter(|s| s.is_result()).collect();
        if cells.is_empty() {
            let outcome = if group.iter().any(|s| s.is_diverged()) { "diverged" } else { "failed" };
            report.push_str(&format!("| {method} | {source} | 0 | {outcome} | {outcome} | - | - | - | - | - |\n"));
            continue;
        }
        let interval = |mean: fn(&CellSummary) -> Option<f64>, low: fn(&CellSummary) -> Option<f64>, high: fn(&CellSummary) -> Option<f64>| {
            let take = |f: fn(&CellSummary) -> Option<f64>| cells.iter().filter_map(|c| f(c)).collect::<Vec<f64>>();
            let (m, l, h) = crate::plot::accuracy_interval(&take(mean), &take(low), &take(high));
            format!("{:.1}% [{:.1}, {:.1}]", 100.0 * m, 100.0 * l, 100.0 * h)
        };
        let lenient = interval(|c| c.accuracy_lenient, |c| c.accuracy_lenient_ci_low, |c| c.accuracy_lenient_ci_high);
        let strict = interval(|c| c.accuracy_strict, |c| c.accuracy_strict_ci_low, |c| c.accuracy_strict_ci_high);
        let maj: Vec<f64> = cells.iter().filter_map(|c| c.accuracy_maj.map(|v| 100.0 * v)).collect();
        let maj = if maj.is_empty() { "-".to_string() } else { format!("{:.1}%", eval::stats::mean_std(&maj).mean) };
        let mut convergence: Vec<u64> = cells.iter().filter_map(|c| c.steps_to_convergence).collect();
        convergence.sort_unstable();
        let convergence = convergence.get(convergence.len() / 2).map_or("-".to_string(), |v| format!("{v} (median)"));
        let norms = fmt_opt(cells.iter().filter_map(|c| c.update_norm_mean).collect(), 4);
        let norm_var = fmt_opt(cells.iter().filter_map(|c| c.update_norm_variance).collect(), 6);
        report.push_str(&format!(
            "| {method} | {source} | {} | {lenient} | {strict} | {maj} | {} | {} | {convergence} | {} |\n",
            cells.len(),
            fmt_opt(cells.iter().filter_map(|c| c.final_reward).collect(), 3),
            fmt_opt(cells.iter().map(|c| c.train_seconds).filter(|s| *s > 0.0).collect(), 0),
            if norms == "-" { norms } else { format!("{norms} ({norm_var})") },
        ));
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("reward_model/metrics.json"))
        && let Ok(rm) = serde_json::from_str::<RewardModelReport>(&text)
    {
        report.push_str(&format!(
            "\nReward model: held-out pairwise accuracy {:.1}% over {} pairs from the test split ({}), mean margin {:.3}, {} steps in {:.0} s.\n",
            100.0 * rm.held_out_accuracy,
            rm.held_out_pairs,
            rm.held_out_accuracy_by_corruption.iter().map(|(kind, accuracy)| format!("{kind} {:.1}%", accuracy * 100.0)).collect::<Vec<_>>().join(", "),
            rm.held_out_mean_margin,
            rm.steps,
            rm.train_seconds
        ));
    }
    let charts = [("accuracy", "Accuracy per method"), ("stability", "Training stability"), ("convergence", "Convergence")];
    let drawn: Vec<_> = charts.iter().filter(|(file, _)| dir.join("charts").join(format!("{file}.svg")).is_file()).collect();
    if !drawn.is_empty() {
        report.push_str("\n## Charts\n\n");
        for (file, title) in drawn {
            report.push_str(&format!("### {title}\n\n![{title}](charts/{file}.svg)\n\n"));
        }
    }
    let diverged: Vec<&CellSummary> = summaries.iter().filter(|s| s.is_diverged()).collect();
    if !diverged.is_empty() {
        report.push_str(&format!(
            "\n## Diverged cells\n\nTheir training diverged (a NaN or infinite loss or gradient, or one step's update larger than {DIVERGENCE_UPDATE_RATIO} x the norm of the policy's weights): they are no result and count in no mean, interval or chart above. Their step rows up to the divergence are in `cells/<id>/metrics.csv`.\n\n"
        ));
        for cell in diverged {
            report.push_str(&format!("- {} / {} / seed {}: {}\n", cell.method, cell.reward_source, cell.seed, cell.error.as_deref().unwrap_or("")));
        }
    }
    let failed: Vec<&CellSummary> = summaries.iter().filter(|s| s.is_failed()).collect();
    if !failed.is_empty() {
        report.push_str("\n## Failed cells\n\nRerun `cargo xtask compare` to retry them (finished cells are skipped).\n\n");
        for cell in failed {
            report.push_str(&format!("- {} / {} / seed {}: {}\n", cell.method, cell.reward_source, cell.seed, cell.error.as_deref().unwrap_or("")));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use rl_algos::rewards::RewardInput;

    /// Rewards that differ within a group, so every method gets a gradient.
    struct Length;
    impl RewardFunction for Length {
        fn name(&self) -> &str {
            "length"
        }
        fn score(&self, batch: &[RewardInput<'_>]) -> Vec<f32> {
            batch.iter().map(|input| (input.completion.len() % 5) as f32).collect()
        }
    }

    /// `policy.lora` reaches every RL method through the runner's own construction
    /// ([`training_policy`] and the registry): after a step the base weights are bit-identical,
    /// the adapters moved, and the policy differs from the full fine-tuning the same step makes.
    #[test]
    fn lora_in_the_study_trains_only_adapters_for_every_method() {
        let device = Device::flex();
        let autodiff = device.clone().autodiff();
        let base = tempfile::tempdir().unwrap();
        autodiff.seed(0);
        let config = policy_models::presets::Preset::TinyGptNeo.config(32, 0, 64);
        CausalLm::init(&config, &device).unwrap().save_dir(base.path(), None).unwrap();
        let text = |lora: &str| {
            format!("name = \"t\"\n[task]\nkind = \"synthetic\"\n[policy]\ntemplate = \"plain\"\n{lora}\n[policy.base]\nkind = \"preset\"\npreset = \"tiny_gpt_neo\"\n[reward_sources.rules]\nrules = [{{ kind = \"strict_correct\", format = \"gsm8k_marker\" }}]\n[methods.grpo]\nkind = \"rl\"\nalgorithm = \"grpo\"\nreward_sources = [\"rules\"]\nsteps = 1\n")
        };
        let lora: Study = toml::from_str(&text("lora = { rank = 2, alpha = 4.0 }")).unwrap();
        let full: Study = toml::from_str(&text("")).unwrap();
        assert_eq!(lora.policy.lora.as_ref().map(|l| (l.rank, l.alpha)), Some((2, 4.0)));
        let rewards = WeightedRewards::new(vec![(Box::new(Length) as Box<dyn RewardFunction>, 1.0)]);
        let decode = |ids: &[i64]| ids.iter().map(|id| char::from(b'a' + (id % 26) as u8)).collect::<String>();
        let environment = Environment { decode: &decode, eos_token_ids: vec![], pad_token_id: 0, stop_strings: vec![], rewards: &rewards };
        let prompts: Vec<PromptItem> = (0..2).map(|i| PromptItem { prompt_ids: vec![1 + i, 2, 3], prompt_text: String::new(), answer: "1".into() }).collect();
        let probe = policy_models::StepInput::from_padded(&[vec![1, 2, 3]], &[vec![true; 3]]);
        let logits = |model: &CausalLm| model.valid().forward(&probe, &mut model.new_cache()).into_data().try_to_vec::<f32>().unwrap();
        for (algorithm, config) in [
            ("grpo", serde_json::json!({"num_generations": 4, "max_completion_length": 4, "beta": 0.04})),
            ("ppo", serde_json::json!({"max_completion_length": 4})),
            ("rloo", serde_json::json!({"num_generations": 4, "max_completion_length": 4, "beta": 0.04})),
        ] {
            let entry = registry().iter().find(|entry| entry.name == algorithm).unwrap();
            let optim = rl_algos::OptimSettings { learning_rate: 1e-2, total_steps: 1, ..Default::default() };
            let step = |study: &Study| {
                let policy = training_policy(study, base.path(), &autodiff, 5).unwrap();
                let before = policy_models::optim::parameter_values(&policy);
                let mut trainer = (entry.build)(AlgorithmInputs { policy, config: config.clone(), optim: optim.clone(), seed: 5 }).unwrap();
                let metrics = trainer.train_step(&prompts, &environment).unwrap();
                assert!(metrics["grad_norm"] > 0.0, "{algorithm}: no gradient: {metrics:?}");
                (before, trainer.into_policy())
            };
            let (before, tuned) = step(&lora);
            let after = policy_models::optim::parameter_values(&tuned);
            let is_adapter = |path: &str| path.ends_with(".lora.a") || path.ends_with(".lora.b");
            assert!(before.keys().filter(|path| is_adapter(path)).count() >= 12, "{algorithm}: adapters on every projection: {:?}", before.keys());
            for (path, values) in &before {
                if is_adapter(path) {
                    if path.ends_with(".lora.b") {
                        assert_ne!(values, &after[path], "{algorithm}: adapter {path} did not train");
                    }
                } else {
                    assert_eq!(values, &after[path], "{algorithm}: base weight {path} changed under LoRA");
                }
            }
            let (full_before, full_tuned) = step(&full);
            let full_after = policy_models::optim::parameter_values(&full_tuned);
            assert!(full_before.keys().all(|path| !is_adapter(path)));
            assert!(full_before.iter().any(|(path, values)| path.ends_with("query.weight") && values != &full_after[path]), "{algorithm}: full fine-tuning moves the base");
            assert_ne!(logits(&tuned), logits(&full_tuned), "{algorithm}: the LoRA update equals full fine-tuning's");
        }
    }

    fn cell(method: &str, seed: u64) -> Cell {
        Cell { method: method.to_string(), reward_source: "rules".to_string(), seed }
    }

    fn finished(method: &str, seed: u64, lenient: f64) -> CellSummary {
        CellSummary {
            accuracy_strict: Some(lenient / 2.0),
            accuracy_strict_ci_low: Some(0.0),
            accuracy_strict_ci_high: Some(lenient),
            accuracy_lenient: Some(lenient),
            accuracy_lenient_ci_low: Some(lenient - 0.1),
            accuracy_lenient_ci_high: Some(lenient + 0.1),
            test_problems: 40,
            steps_to_convergence: Some(3),
            status: CellStatus::Finished,
            error: None,
            ..failed_summary(&cell(method, seed), String::new())
        }
    }

    /// A failed cell's summary has no accuracy at all (it was NaN, which JSON writes as `null`
    /// and `plot` refused), reads back, and keeps summary.csv's columns aligned.
    #[test]
    fn failed_summaries_have_absent_accuracies_and_aligned_csv_rows() {
        let failed = failed_summary(&cell("grpo", 1), "step 2: out of memory".to_string());
        let json = serde_json::to_string(&failed).unwrap();
        assert!(!json.contains("accuracy_strict") && !json.contains("accuracy_lenient") && !json.contains("NaN"), "{json}");
        assert!(json.contains(r#""status":"failed""#), "{json}");
        assert_eq!(serde_json::from_str::<CellSummary>(&json).unwrap(), failed);
        assert!(failed.is_failed() && !failed.is_result() && !failed.is_diverged());
        // What earlier versions wrote for a failed cell: null accuracies, no status.
        let old = r#"{"method":"grpo","reward_source":"rules","seed":0,"accuracy_strict":null,"accuracy_strict_ci_low":null,"accuracy_strict_ci_high":null,"accuracy_lenient":null,"accuracy_lenient_ci_low":null,"accuracy_lenient_ci_high":null,"test_problems":0,"train_seconds":0.0,"steps_to_convergence":null,"update_norm_variance":null,"error":"boom"}"#;
        let old: CellSummary = serde_json::from_str(old).unwrap();
        assert!(old.is_failed() && old.accuracy_strict.is_none());
        let done = finished("grpo", 0, 0.5);
        assert!(done.is_result() && !done.is_failed());
        // summary.csv: the same columns as summary.json's fields, every row as wide as the header.
        let mut writer = csv::Writer::from_writer(Vec::new());
        for summary in [&failed, &done] {
            writer.serialize(SummaryCsvRow::from(summary)).unwrap();
        }
        let text = String::from_utf8(writer.into_inner().unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let header: std::collections::BTreeSet<&str> = lines[0].split(',').collect();
        let value = serde_json::to_value(&done).unwrap();
        let keys: std::collections::BTreeSet<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(header, keys, "SummaryCsvRow and CellSummary differ");
        assert!(lines[0].starts_with("method,reward_source,seed,accuracy_strict,") && lines[0].ends_with(",error,status"), "{text}");
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("grpo,rules,1,,,,,,,0,") && lines[1].ends_with(",step 2: out of memory,failed"), "{text}");
        assert!(lines[2].starts_with("grpo,rules,0,0.25,0.0,0.5,0.5,") && lines[2].ends_with(",,finished"), "{text}");
    }

    #[test]
    fn divergence_is_a_non_finite_quantity_or_an_update_larger_than_the_weights() {
        let row = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<rl_algos::Metrics>();
        assert_eq!(divergence(&row(&[("loss", 0.3), ("grad_norm", 2.0), ("update_norm", 0.5), ("reward", f64::NAN)]), 10.0), None);
        assert_eq!(divergence(&row(&[("loss", 0.3)]), 10.0), None, "no update_norm, nothing to judge");
        assert_eq!(divergence(&row(&[("loss/policy", f64::INFINITY), ("update_norm", 0.5)]), 10.0).as_deref(), Some("loss/policy is inf"));
        assert_eq!(divergence(&row(&[("grad_norm", f64::NAN)]), 10.0).as_deref(), Some("grad_norm is NaN"));
        let why = divergence(&row(&[("loss", 0.3), ("update_norm", 10.5)]), 10.0).unwrap();
        assert!(why.starts_with("update_norm 1.0500e1 exceeds 1 x the norm") && why.contains("(1.0000e1)"), "{why}");
        assert_eq!(divergence(&row(&[("update_norm", 9.9)]), 10.0), None);
    }

    /// Rows reach the disk as they come (a crash keeps them), and a row with a new column widens
    /// the header of the rows before it: the finished file is one table.
    #[test]
    fn metrics_rows_are_on_disk_after_each_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let mut file = MetricsFile::create(&cell("grpo", 2), dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "method,reward_source,seed,step\n");
        let row = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<rl_algos::Metrics>();
        file.push(&row(&[("step", 0.0), ("eval/accuracy_lenient", 0.25)])).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "method,reward_source,seed,step,eval/accuracy_lenient\ngrpo,rules,2,0,0.25\n");
        file.push(&row(&[("step", 1.0), ("reward", 0.5), ("loss", 1.5)])).unwrap();
        file.push(&row(&[("step", 2.0), ("reward", 0.75), ("loss", 1.25), ("eval/accuracy_lenient", 0.5)])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "method,reward_source,seed,step,eval/accuracy_lenient,loss,reward\ngrpo,rules,2,0,0.25,,\ngrpo,rules,2,1,,1.5,0.5\ngrpo,rules,2,2,0.5,1.25,0.75\n"
        );
        // A fresh file for a rerun of the cell starts over.
        MetricsFile::create(&cell("grpo", 2), dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    /// report.md: a diverged or failed seed counts in no mean; a group with no result says why;
    /// both are listed with their reasons.
    #[test]
    fn the_report_leaves_cells_without_a_result_out_of_the_means() {
        let dir = tempfile::tempdir().unwrap();
        let diverged = unfinished_summary(&cell("grpo", 1), CellStatus::Diverged, "step 1: update_norm 3e4 exceeds".to_string(), 2.0);
        let hot = unfinished_summary(&cell("hot", 0), CellStatus::Diverged, "step 2: the loss is NaN".to_string(), 2.0);
        let failed = failed_summary(&cell("ppo", 0), "panic: boom".to_string());
        let report = report_markdown(dir.path(), &[finished("grpo", 0, 0.5), diverged, hot, failed]);
        assert!(report.contains("| grpo | rules | 1 | 50.0% [40.0, 60.0] | 25.0% "), "{report}");
        assert!(report.contains("| hot | rules | 0 | diverged | diverged |") && report.contains("| ppo | rules | 0 | failed | failed |"), "{report}");
        let diverged_section = &report[report.find("## Diverged cells").unwrap()..report.find("## Failed cells").unwrap()];
        assert!(diverged_section.contains("- grpo / rules / seed 1: step 1: update_norm 3e4 exceeds\n- hot / rules / seed 0: step 2: the loss is NaN\n"), "{report}");
        assert!(report.ends_with("- ppo / rules / seed 0: panic: boom\n"), "{report}");
    }

    #[test]
    fn answer_endings_vary_line_by_line_at_the_given_share() {
        let text = "Q: What is 2 + 3?\nA: Let's break it down.\n2 + 3 = 5\n#### 5\nQ: What is 1 - 4?\nA: Let's break it down.\n1 - 4 = -3\n#### -3";
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(vary_answer_endings(text, 1.0, &mut rng), text);
        let free = vary_answer_endings(text, 0.0, &mut rng);
        assert!(free.ends_with("1 - 4 = -3\nThe answer is -3.") && free.contains("2 + 3 = 5\nThe answer is 5.\nQ:"), "{free}");
        let kept = (0..1000).filter(|_| vary_answer_endings("#### 7\n", 0.3, &mut rng) == "#### 7\n").count();
        assert!((250..350).contains(&kept), "{kept}");
    }

    /// One problem per example: the prompt starts with the tiny base's BOS (its tokenizer's
    /// template) and the completion, which continues it, does not (a completion that began with
    /// BOS = EOS taught the base to end its answers before writing them).
    #[test]
    fn supervised_completions_carry_no_bos_of_their_own() {
        let mut study: Study = toml::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/default.toml")).unwrap()).unwrap();
        let PolicyBase::Preset { sft, .. } = &mut study.policy.base else { panic!("the default study trains a preset") };
        sft.problems_per_document = 0;
        sft.steps = 8;
        let sft = sft.clone();
        let task = load_task(&study).unwrap();
        let corpus = task.train.problems.iter().take(500).map(|p| format!("{} {}", p.question, p.solution));
        let tokenizer = train_tokenizer(corpus.collect::<Vec<_>>().into_iter(), 384).unwrap();
        let eos = tokenizer.eos_ids[0];
        let tokenizer = tokenizer.prepending_bos(eos).unwrap();
        let examples = sft_examples(&study, &task, &sft, &tokenizer).unwrap();
        assert!(!examples.is_empty());
        for example in &examples {
            assert_eq!(example.prompt_ids[0], i64::from(eos), "the prompt starts with the BOS");
            assert_ne!(example.completion_ids[0], i64::from(eos), "a completion starts with the BOS");
            assert_eq!(example.completion_ids.last(), Some(&i64::from(eos)), "a completion ends with EOS");
        }
    }

    fn shared_tokenizer(name: &str) -> PolicyTokenizer {
        let root = std::env::var_os("COTLAB_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
        PolicyTokenizer::load_dir(&root.join("tokenizers").join(name)).unwrap()
    }

    #[test]
    fn prompts_start_with_a_bos_only_where_the_tokenizer_puts_one() {
        let builder = PromptBuilder::new(prompting::Template::Plain);
        let text = builder.render("What is 2 + 3?").unwrap();
        // Their configs name a BOS (SmolLM2's is <|im_start|>) that their tokenizers never add.
        for name in ["smollm2-instruct", "qwen2.5-instruct", "gpt2"] {
            let tokenizer = shared_tokenizer(name);
            let ids = encode_prompt(&tokenizer, &builder, &text).unwrap();
            let plain: Vec<i64> = tokenizer.encode(&text, false).unwrap().into_iter().map(i64::from).collect();
            assert_eq!(ids, plain, "{name}");
        }
        // Llama 3's puts <|begin_of_text|> in front of plain text; its chat template writes it
        // itself, and it must not come twice.
        let llama = shared_tokenizer("llama-3.2-instruct");
        let ids = encode_prompt(&llama, &builder, &text).unwrap();
        assert_eq!((ids[0], ids[1]), (128000, 48), "{ids:?}");
        let root = std::env::var_os("COTLAB_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
        let chat = prompting::ChatTemplate::from_dir(&root.join("tokenizers/llama-3.2-instruct")).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("date_string".to_string(), "26 Jul 2024".into());
        let chat_builder = builder.clone().with_chat_template(chat, extra);
        let chat_text = chat_builder.render("What is 2 + 3?").unwrap();
        let ids = encode_prompt(&llama, &chat_builder, &chat_text).unwrap();
        assert_eq!(ids[0], 128000);
        assert_eq!(ids.iter().filter(|&&id| id == 128000).count(), 1, "{ids:?}");
        // A prompt cut to fit keeps that first token.
        let cut = fit(ids.clone(), 12, llama.prepended_bos().map(i64::from));
        assert_eq!((cut.len(), cut[0], &cut[1..]), (12, 128000, &ids[ids.len() - 11..]));
    }

    #[test]
    fn a_base_saved_without_the_bos_template_gets_it_on_reuse() {
        let texts = ["Q: What is 2 + 3?\nA: 5".to_string(), "Q: What is 4 + 4?\nA: 8".to_string()];
        let trained = train_tokenizer(texts.into_iter(), 300).unwrap();
        let eos = trained.eos_ids[0];
        // As such a base was saved: no template, and its BOS named only in the configs.
        let dir = tempfile::tempdir().unwrap();
        trained.save(&dir.path().join("tokenizer.json")).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}"#).unwrap();
        std::fs::write(dir.path().join("config.json"), format!(r#"{{"bos_token_id": {eos}, "eos_token_id": {eos}}}"#)).unwrap();
        assert_eq!(PolicyTokenizer::load_dir(dir.path()).unwrap().prepended_bos(), None);
        add_missing_bos_template(dir.path()).unwrap();
        let upgraded = PolicyTokenizer::load_dir(dir.path()).unwrap();
        assert_eq!(upgraded.prepended_bos(), Some(eos));
        let ids = encode(&upgraded, "Q: What is 2 + 3?", true).unwrap();
        assert_eq!(ids[0], i64::from(eos));
        assert_eq!(ids[1..], encode(&upgraded, "Q: What is 2 + 3?", false).unwrap()[..]);
        // A second pass leaves it as it is.
        add_missing_bos_template(dir.path()).unwrap();
        assert_eq!(encode(&PolicyTokenizer::load_dir(dir.path()).unwrap(), "Q: What is 2 + 3?", true).unwrap(), ids);
    }
}
