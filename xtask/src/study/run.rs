//! Running a study: the base policy, the reward model, then every cell of the matrix, each
//! written atomically under `reports/<study>/` so that a rerun skips what is done.

use std::io::Write;
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
use rl_algos::rewards::{RewardFunction, WeightedRewards};
use rl_algos::{AlgorithmInputs, Environment, PromptItem};
use serde::{Deserialize, Serialize};
use tasks::{Problem, TaskData};

use crate::common::write_atomically;
use crate::study::config::{Cell, MethodSpec, PolicyBase, RewardModelSpec, Study, TaskSpec, registry};

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

/// One cell's results (`cells/<id>/summary.json`, and a row of `summary.csv`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellSummary {
    /// Method name.
    pub method: String,
    /// Reward source (`-` for none).
    pub reward_source: String,
    /// Seed.
    pub seed: u64,
    /// Strict accuracy with its 95% Wilson interval.
    pub accuracy_strict: f64,
    /// Lower bound.
    pub accuracy_strict_ci_low: f64,
    /// Upper bound.
    pub accuracy_strict_ci_high: f64,
    /// Lenient accuracy.
    pub accuracy_lenient: f64,
    /// Lower bound.
    pub accuracy_lenient_ci_low: f64,
    /// Upper bound.
    pub accuracy_lenient_ci_high: f64,
    /// Held-out problems evaluated.
    pub test_problems: usize,
    /// Training seconds (0 for methods that do not train).
    pub train_seconds: f64,
    /// Steps to convergence of the reward curve (none for methods that do not train).
    pub steps_to_convergence: Option<u64>,
    /// Variance of `update_norm` over steps.
    pub update_norm_variance: Option<f64>,
    /// Error, when the cell failed.
    pub error: Option<String>,
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
    let reward_model = prepare_reward_model(study, &dir, options, &progress)?;
    let matrix = study.matrix();
    let overall = progress.add(ProgressBar::new(matrix.len() as u64));
    overall.set_style(ProgressStyle::with_template("cells {bar:30} {pos}/{len} eta {eta} {msg}")?);
    let mut summaries = Vec::new();
    for cell in &matrix {
        let cell_dir = dir.join("cells").join(cell.id());
        let summary_path = cell_dir.join("summary.json");
        // Finished cells are skipped on a rerun; failed ones are tried again.
        let earlier = std::fs::read_to_string(&summary_path).ok().and_then(|text| serde_json::from_str::<CellSummary>(&text).ok());
        if let (Some(summary), false) = (earlier.filter(|s| s.error.is_none()), options.force) {
            log(options.quiet, &progress, format!("{}: done earlier, skipped", cell.id()));
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
        log(
            options.quiet,
            &progress,
            format!(
                "{}: strict {:.1}% lenient {:.1}% ({:.0} s)",
                cell.id(),
                summary.accuracy_strict * 100.0,
                summary.accuracy_lenient * 100.0,
                started.elapsed().as_secs_f64()
            ),
        );
        write_atomically(&summary_path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        summaries.push(summary);
        overall.inc(1);
    }
    overall.finish_and_clear();
    write_reports(&dir, &matrix, &summaries)?;
    Ok(summaries)
}

fn failed_summary(cell: &Cell, error: String) -> CellSummary {
    CellSummary {
        method: cell.method.clone(),
        reward_source: cell.reward_source.clone(),
        seed: cell.seed,
        accuracy_strict: f64::NAN,
        accuracy_strict_ci_low: f64::NAN,
        accuracy_strict_ci_high: f64::NAN,
        accuracy_lenient: f64::NAN,
        accuracy_lenient_ci_low: f64::NAN,
        accuracy_lenient_ci_high: f64::NAN,
        test_problems: 0,
        train_seconds: 0.0,
        steps_to_convergence: None,
        update_norm_variance: None,
        error: Some(error),
    }
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
        let chat = prompting::ChatTemplate::from_tokenizer_config(&base_dir.join("tokenizer_config.json"))?;
        builder = builder.with_chat_template(chat, serde_json::Map::new());
    }
    Ok(builder)
}

/// Keeps the last `limit` tokens of a prompt (the question is at the end; exemplars go first).
fn fit(mut ids: Vec<i64>, limit: usize) -> Vec<i64> {
    if ids.len() > limit {
        ids.drain(..ids.len() - limit);
    }
    ids
}

fn encode(tokenizer: &PolicyTokenizer, text: &str) -> anyhow::Result<Vec<i64>> {
    let mut ids: Vec<i64> = tokenizer.encode(text, false)?.into_iter().map(i64::from).collect();
    if let Some(bos) = tokenizer.bos_id.filter(|bos| ids.first() != Some(&i64::from(*bos))) {
        ids.insert(0, i64::from(bos));
    }
    Ok(ids)
}

/// Trains (or locates) the base policy; returns its checkpoint directory.
fn prepare_base(study: &Study, task: &TaskData, dir: &Path, device: &Device, options: &RunOptions, progress: &MultiProgress) -> anyhow::Result<PathBuf> {
    let (preset, vocab_size, sft) = match &study.policy.base {
        PolicyBase::Checkpoint { model } => return Ok(ModelSource::parse(model).resolve()?),
        PolicyBase::Preset { preset, vocab_size, sft } => (*preset, *vocab_size, sft),
    };
    let base_dir = dir.join("base");
    if base_dir.join("model.safetensors").is_file() && !options.force {
        log(options.quiet, progress, format!("base policy: {} (trained earlier)", base_dir.display()));
        return Ok(base_dir);
    }
    let template = study.policy.template;
    let corpus = task.train.problems.iter().map(|p| {
        let builder = PromptBuilder::new(template);
        format!("{}{}", builder.render(&p.question).unwrap_or_default(), builder.target(p))
    });
    let tokenizer = train_tokenizer(corpus.collect::<Vec<_>>().into_iter(), vocab_size)?;
    let eos = tokenizer.eos_ids[0];
    let pad = i64::from(tokenizer.pad_id.unwrap_or(eos));
    let train_count = ((task.train.len() as f64) * sft.data_fraction).round().max(1.0) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut examples = Vec::with_capacity(train_count);
    for problem in &task.train.problems[..train_count] {
        // Some examples carry 1-2 exemplars, so few-shot prompts are a natural continuation.
        let k = rng.random_range(0..=2usize);
        let exemplars = sample_exemplars(&task.train, k, rng.random())?;
        let builder = PromptBuilder::new(template).with_exemplars(exemplars);
        let mut prompt_ids = encode(&tokenizer, &builder.render(&problem.question)?)?;
        let mut completion_ids = encode(&tokenizer, &builder.target(problem))?;
        completion_ids.push(i64::from(eos));
        let room = study.policy.max_length.saturating_sub(completion_ids.len());
        if prompt_ids.len() > room {
            prompt_ids.drain(..prompt_ids.len() - room);
        }
        completion_ids.truncate(study.policy.max_length - prompt_ids.len().min(study.policy.max_length - 1));
        examples.push(SftExample { prompt_ids, completion_ids });
    }
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
    let history = trainer.run(&examples, None, None, |step| {
        bar.set_message(format!("loss {:.3}", step.loss));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let last = history.last().map_or(f64::NAN, |s| s.loss);
    log(options.quiet, progress, format!("base policy: {} supervised steps, final loss {last:.3}", history.len()));
    trainer.model().save_dir(&base_dir, Some(&tokenizer))?;
    Ok(base_dir)
}

/// Trains (or loads) the reward model when a reward source uses one.
fn prepare_reward_model(study: &Study, _dir: &Path, options: &RunOptions, progress: &MultiProgress) -> anyhow::Result<Option<PathBuf>> {
    let needed = study.reward_sources.values().any(|source| source.reward_model_weight.is_some());
    let Some(spec) = study.reward_model.as_ref().filter(|_| needed) else { return Ok(None) };
    match spec {
        RewardModelSpec::Checkpoint { model, fine_tune: None } => Ok(Some(ModelSource::parse(model).resolve()?)),
        RewardModelSpec::Checkpoint { fine_tune: Some(_), .. } | RewardModelSpec::Train { .. } => {
            // The cells that need it fail with their own error; the others run.
            log(options.quiet, progress, "reward model: training one inside a study is not in this build yet; cells that use it will fail (see `cargo xtask reward-model`)".to_string());
            Ok(None)
        }
    }
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
    let (policy, k, train_seconds, metrics) = match method {
        MethodSpec::FewShot { k } => (CausalLm::load_dir(base_dir, device)?, *k, 0.0, Vec::new()),
        MethodSpec::Base => (CausalLm::load_dir(base_dir, device)?, 0, 0.0, Vec::new()),
        MethodSpec::Rl { algorithm, steps, prompts_per_step, few_shot_k, optim, config, .. } => {
            let _ = reward_model;
            let source = &study.reward_sources[&cell.reward_source];
            if source.reward_model_weight.is_some() {
                bail!("reward source {}: the reward model is not available in this build yet", cell.reward_source);
            }
            let rewards = WeightedRewards::new(
                source.rules.iter().map(|rule| (Box::new(rule.kind) as Box<dyn RewardFunction>, rule.weight)).collect(),
            );
            let autodiff = device.clone().autodiff();
            let entry = registry().iter().find(|entry| entry.name == algorithm).context("algorithm not registered")?;
            let mut optim = optim.clone();
            optim.total_steps = *steps;
            let inputs = AlgorithmInputs { policy: CausalLm::load_dir(base_dir, &autodiff)?, config: config.clone(), optim, seed: cell.seed };
            let mut algorithm = (entry.build)(inputs)?;
            let builder = prompt_builder(study, task, base_dir, *few_shot_k, cell.seed)?;
            let decode = |ids: &[i64]| tokenizer.decode(&ids.iter().map(|&id| id as u32).collect::<Vec<_>>(), true).unwrap_or_default();
            let environment = Environment {
                decode: &decode,
                eos_token_ids: tokenizer.eos_ids.iter().map(|&id| i64::from(id)).collect(),
                pad_token_id: tokenizer.pad_id.map_or(0, i64::from),
                stop_strings: study.policy.template.stop_sequences().iter().map(|s| s.to_string()).collect(),
                rewards: &rewards,
            };
            let bar = progress.add(ProgressBar::new(*steps));
            bar.set_style(ProgressStyle::with_template("  {msg:30} {bar:30} {pos}/{len} eta {eta}")?);
            bar.set_message(cell.id());
            let started = Instant::now();
            let mut rng = ChaCha8Rng::seed_from_u64(cell.seed);
            let completion_limit = config.get("max_completion_length").and_then(|v| v.as_u64()).unwrap_or(128) as usize;
            let rl_prompt_limit = study.policy.max_length.saturating_sub(completion_limit).max(8);
            let mut history = Vec::new();
            for _ in 0..*steps {
                let prompts: Vec<PromptItem> = (0..*prompts_per_step)
                    .map(|_| {
                        let problem = &task.train.problems[rng.random_range(0..task.train.len())];
                        let text = builder.render(&problem.question)?;
                        let prompt_ids = fit(encode(tokenizer, &text)?, rl_prompt_limit);
                        Ok(PromptItem { prompt_ids, prompt_text: text, answer: problem.answer.clone() })
                    })
                    .collect::<anyhow::Result<_>>()?;
                history.push(algorithm.train_step(&prompts, &environment)?);
                bar.inc(1);
            }
            bar.finish_and_clear();
            let seconds = started.elapsed().as_secs_f64();
            let _ = quiet;
            (algorithm.into_policy().valid(), *few_shot_k, seconds, history)
        }
    };
    write_metrics(cell, cell_dir, &metrics)?;
    let builder = prompt_builder(study, task, base_dir, k, cell.seed)?;
    let (summary, samples) = evaluate(study, &policy, tokenizer, &builder, test)?;
    let mut file = std::fs::File::create(cell_dir.join("samples.jsonl.tmp"))?;
    for sample in samples.iter().take(study.evaluation.samples) {
        writeln!(file, "{}", serde_json::to_string(sample)?)?;
    }
    std::fs::rename(cell_dir.join("samples.jsonl.tmp"), cell_dir.join("samples.jsonl"))?;
    let rewards: Vec<f64> = metrics.iter().map(|m| m.get("reward").copied().unwrap_or(f64::NAN)).collect();
    let steps: Vec<u64> = (1..=rewards.len() as u64).collect();
    let update_norms: Vec<f64> = metrics.iter().filter_map(|m| m.get("update_norm").copied()).collect();
    Ok(CellSummary {
        method: cell.method.clone(),
        reward_source: cell.reward_source.clone(),
        seed: cell.seed,
        accuracy_strict: summary.strict.accuracy,
        accuracy_strict_ci_low: summary.strict.ci_low,
        accuracy_strict_ci_high: summary.strict.ci_high,
        accuracy_lenient: summary.lenient.accuracy,
        accuracy_lenient_ci_low: summary.lenient.ci_low,
        accuracy_lenient_ci_high: summary.lenient.ci_high,
        test_problems: summary.strict.n,
        train_seconds,
        steps_to_convergence: eval::stats::steps_to_convergence(&steps, &rewards, 0.6, 0.9),
        update_norm_variance: (!update_norms.is_empty()).then(|| eval::stats::sample_variance(&update_norms)),
        error: None,
    })
}

#[derive(Serialize)]
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

/// Greedy answers to the held-out problems, scored.
fn evaluate(study: &Study, policy: &CausalLm, tokenizer: &PolicyTokenizer, builder: &PromptBuilder, test: &[Problem]) -> anyhow::Result<(AccuracySummary, Vec<Sample>)> {
    let template = study.policy.template;
    let stops: Vec<String> = template.stop_sequences().iter().map(|s| s.to_string()).collect();
    let decode = |ids: &[i64]| tokenizer.decode(&ids.iter().map(|&id| id as u32).collect::<Vec<_>>(), true).unwrap_or_default();
    let config = GenerationConfig {
        max_new_tokens: study.evaluation.max_new_tokens,
        sampler: Sampler::Greedy,
        eos_token_ids: tokenizer.eos_ids.iter().map(|&id| i64::from(id)).collect(),
        pad_token_id: tokenizer.pad_id.map_or(0, i64::from),
        seed: 0,
    };
    let mut scores = Vec::with_capacity(test.len());
    let mut samples = Vec::new();
    for chunk in test.chunks(study.evaluation.batch_size.max(1)) {
        let limit = prompt_limit(study, policy);
        let prompts: Vec<Vec<i64>> =
            chunk.iter().map(|p| Ok(fit(encode(tokenizer, &builder.render(&p.question)?)?, limit))).collect::<anyhow::Result<_>>()?;
        let generation = generate(policy, &prompts, &config, &stops, Some(&decode));
        for ((problem, ids), mask) in chunk.iter().zip(&generation.completion_ids).zip(&generation.completion_mask) {
            let kept: Vec<i64> = ids.iter().zip(mask).filter(|(_, m)| **m).map(|(id, _)| *id).collect();
            let mut completion = decode(&kept);
            // Cut at a stop string, as a user of the completion would.
            if let Some(cut) = stops.iter().filter_map(|stop| completion.find(stop.as_str())).min() {
                completion.truncate(cut);
            }
            let score = score_completion(&completion, &problem.answer, template.answer_format());
            samples.push(Sample { question: problem.question.clone(), answer: problem.answer.clone(), completion, strict: score.strict, lenient: score.lenient });
            scores.push(score);
        }
    }
    Ok((AccuracySummary::from_scores(&scores), samples))
}

/// `cells/<id>/metrics.csv`: one row per step, the algorithm's metric names as columns.
fn write_metrics(cell: &Cell, cell_dir: &Path, metrics: &[rl_algos::Metrics]) -> anyhow::Result<()> {
    let columns: Vec<String> = metrics.iter().flat_map(|m| m.keys().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let mut writer = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["method".to_string(), "reward_source".to_string(), "seed".to_string(), "step".to_string()];
    header.extend(columns.iter().cloned());
    writer.write_record(&header)?;
    for (index, row) in metrics.iter().enumerate() {
        let mut record = vec![cell.method.clone(), cell.reward_source.clone(), cell.seed.to_string(), (index + 1).to_string()];
        record.extend(columns.iter().map(|column| row.get(column).map_or(String::new(), |v| v.to_string())));
        writer.write_record(&record)?;
    }
    write_atomically(&cell_dir.join("metrics.csv"), &writer.into_inner()?)
}

/// `summary.csv`, `summary.json` and `report.md` over all cells.
fn write_reports(dir: &Path, matrix: &[Cell], summaries: &[CellSummary]) -> anyhow::Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for summary in summaries {
        writer.serialize(summary)?;
    }
    write_atomically(&dir.join("summary.csv"), &writer.into_inner()?)?;
    write_atomically(&dir.join("summary.json"), serde_json::to_string_pretty(summaries)?.as_bytes())?;
    let mut report = String::from("# Study results\n\n| method | reward source | seeds | lenient accuracy (mean ± sd) | strict accuracy (mean ± sd) |\n|---|---|---|---|---|\n");
    let mut groups: Vec<(String, String)> = matrix.iter().map(|c| (c.method.clone(), c.reward_source.clone())).collect();
    groups.dedup();
    for (method, source) in groups {
        let cells: Vec<&CellSummary> = summaries.iter().filter(|s| s.method == method && s.reward_source == source && s.error.is_none()).collect();
        let lenient = eval::stats::mean_std(&cells.iter().map(|s| s.accuracy_lenient * 100.0).collect::<Vec<_>>());
        let strict = eval::stats::mean_std(&cells.iter().map(|s| s.accuracy_strict * 100.0).collect::<Vec<_>>());
        report.push_str(&format!(
            "| {method} | {source} | {} | {:.1}% ± {:.1} | {:.1}% ± {:.1} |\n",
            cells.len(),
            lenient.mean,
            lenient.std,
            strict.mean,
            strict.std
        ));
    }
    write_atomically(&dir.join("report.md"), report.as_bytes())
}
