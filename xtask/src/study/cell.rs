//! One cell of the matrix: its policy (trained through the algorithm registry, with held-out
//! evaluation during training and divergence checks), then its final evaluation and summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::tensor::Device;
use policy_models::{CausalLm, ModelSource, PolicyTokenizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rl_algos::rewards::{RewardFunction, WeightedRewards};
use rl_algos::{AlgorithmInputs, Environment, PromptItem};
use tasks::{Problem, TaskData};

use crate::common::write_atomically;
use crate::study::checkpoint;
use crate::study::config::{Cell, MethodSpec, PolicyBase, Study, registry};
use crate::study::evaluate::{Sample, evaluate, majority_accuracy};
use crate::study::progress::Progress;
use crate::study::prompts::{encode_prompt, fit, prompt_builder};
use crate::study::report::{CellStatus, CellSummary, MetricsFile, unfinished_summary};
use crate::study::reward_model::load_reward_function;

/// The policy an RL cell trains: the base on `autodiff`, with the study's LoRA adapters when
/// `policy.lora` names them (their A factors drawn from the device generator seeded with the
/// cell's seed), so that only the adapters train.
pub(crate) fn training_policy(
    study: &Study,
    base_dir: &Path,
    autodiff: &Device,
    seed: u64,
) -> anyhow::Result<CausalLm> {
    let policy = CausalLm::load_dir(base_dir, autodiff)?;
    let Some(lora) = &study.policy.lora else { return Ok(policy) };
    autodiff.seed(seed);
    policy.with_lora(lora).map_err(|error| anyhow::anyhow!("policy.lora: {error}"))
}

/// The base checkpoint as PEFT's `base_model_name_or_path`: the hub id, or the directory (for a
/// GGUF file, its converted directory, which transformers loads as it is).
pub(crate) fn base_model_name(study: &Study, base_dir: &Path) -> String {
    if let PolicyBase::Checkpoint { model } = &study.policy.base
        && let Ok(ModelSource::Hub { repo, .. }) = ModelSource::parse(model)
    {
        return repo;
    }
    std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf()).display().to_string()
}

#[allow(clippy::too_many_arguments, reason = "the cell's whole context")]
pub(crate) fn run_cell(
    study: &Study,
    cell: &Cell,
    task: &TaskData,
    base_dir: &Path,
    tokenizer: &PolicyTokenizer,
    reward_model: Option<&PathBuf>,
    cell_dir: &Path,
    device: &Device,
    progress: &Progress,
) -> anyhow::Result<CellSummary> {
    let method = &study.methods[&cell.method];
    let test: &[Problem] = &task.test.problems[..study.evaluation.test_size.min(task.test.len())];
    let sample_questions = &test[..study.evaluation.samples.min(test.len())];
    let mut samples_before: Vec<Sample> = Vec::new();
    // Written as the steps come, so the rows of a cell that diverges or crashes stay on disk.
    let mut metrics_file = MetricsFile::create(cell, cell_dir)?;
    let (policy, k, train_seconds, metrics) = match method {
        MethodSpec::FewShot { k } => (CausalLm::load_dir(base_dir, device)?, *k, 0.0, Vec::new()),
        MethodSpec::Base {} => (CausalLm::load_dir(base_dir, device)?, 0, 0.0, Vec::new()),
        MethodSpec::Rl { algorithm, steps, prompts_per_step, few_shot_k, config, .. } => {
            let source = &study.reward_sources[&cell.reward_source];
            let mut functions: Vec<(Box<dyn RewardFunction>, f32)> =
                source.rules.iter().map(|rule| (Box::new(rule.kind) as Box<dyn RewardFunction>, rule.weight)).collect();
            if let Some(weight) = source.reward_model_weight {
                let rm_dir = reward_model.with_context(|| {
                    format!("reward source {} needs the reward model, which was not prepared", cell.reward_source)
                })?;
                functions.push((load_reward_function(rm_dir, device, source.normalize_reward_model)?, weight));
            }
            let rewards = WeightedRewards::new(functions);
            let autodiff = device.clone().autodiff();
            let entry = registry().iter().find(|entry| entry.name == algorithm).context("algorithm not registered")?;
            let optim = study.rl_optim(&cell.method, registry())?;
            // cotlab's native bf16 product needs AVX-512 BF16; without it flex emulates bf16.
            if optim.dtype == policy_models::optim::TrainDtype::Bf16
                && study.backend == policy_models::BackendKind::Flex
                && !policy_models::bf16_gemm::supported()
            {
                progress.log(format!(
                    "{}: methods.{}.optim.dtype = \"bf16\" on a CPU without AVX-512 BF16, where the flex backend computes \
                     bf16 products in f32 between conversions: a step takes about twice an f32 one \
                     (docs/performance.md#bf16). The numbers are bf16's; for speed on this CPU leave dtype at f32",
                    cell.id(),
                    cell.method
                ));
            }
            let start = training_policy(study, base_dir, &autodiff, cell.seed)?;
            // The scale an update is judged against (see `divergence`): the starting policy's,
            // for a resumed cell too.
            let weight_norm = parameter_norm(&start);
            let inputs = AlgorithmInputs { policy: start, config: config.clone(), optim, seed: cell.seed };
            let method_value = serde_json::to_value(method)?;
            let resume = match checkpoint::recover(cell_dir)? {
                Some(dir) => {
                    let state = checkpoint::RunnerState::read(&dir)
                        .with_context(|| format!("delete {} to start {} over", dir.display(), cell.id()))?;
                    if state.method == method_value && state.step <= *steps {
                        Some((dir, state))
                    } else {
                        progress.log(format!("{}: the checkpoint at step {} was written with other settings of methods.{}; starting over", cell.id(), state.step, cell.method));
                        checkpoint::remove(cell_dir)?;
                        None
                    }
                }
                None => None,
            };
            let builder = prompt_builder(study, task, base_dir, *few_shot_k, cell.seed)?;
            let mut rng = ChaCha8Rng::seed_from_u64(cell.seed);
            let mut history = Vec::new();
            // Training and evaluation seconds of the runs before this one (a resumed cell).
            let (mut earlier_train_seconds, mut earlier_eval_seconds) = (0.0, 0.0);
            let mut algorithm = match &resume {
                Some((dir, state)) => {
                    progress.log(format!("resuming {} from step {}", cell.id(), state.step));
                    let algorithm = (entry.resume)(inputs, dir).with_context(|| {
                        format!("cannot resume {} from {}; delete it to start the cell over", cell.id(), dir.display())
                    })?;
                    anyhow::ensure!(
                        algorithm.steps() == state.step,
                        "{}: the algorithm's checkpoint is at step {}, the runner's at {}; delete {} to start the cell over",
                        cell.id(),
                        algorithm.steps(),
                        state.step,
                        dir.display()
                    );
                    state.restore_rng(&mut rng)?;
                    history = state.metrics_rows()?;
                    metrics_file = MetricsFile::restore(cell, cell_dir, history.clone())?;
                    samples_before = state.samples_before.clone();
                    (earlier_train_seconds, earlier_eval_seconds) = (state.train_seconds, state.eval_seconds);
                    algorithm
                }
                None => {
                    let algorithm = (entry.build)(inputs)?;
                    // What the policy wrote before training, for samples.jsonl.
                    samples_before =
                        evaluate(study, &algorithm.policy().valid(), tokenizer, &builder, sample_questions, progress)?
                            .samples;
                    algorithm
                }
            };
            let first_step = resume.as_ref().map_or(0, |(_, state)| state.step) + 1;
            let decode = |ids: &[i64]| {
                tokenizer.decode(&ids.iter().map(|&id| id as u32).collect::<Vec<_>>(), true).unwrap_or_default()
            };
            let environment = Environment {
                decode: &decode,
                eos_token_ids: tokenizer.eos_ids.iter().map(|&id| i64::from(id)).collect(),
                pad_token_id: tokenizer.pad_id.map_or(0, i64::from),
                stop_strings: study.policy.template.stop_sequences().iter().map(|s| s.to_string()).collect(),
                rewards: &rewards,
            };
            let mut bar = progress.bar(*steps, cell.id(), 1);
            bar.set_position(first_step - 1);
            let started = Instant::now();
            let completion_limit = (entry.rollout_shape)(config).map_err(anyhow::Error::msg)?.max_completion_length;
            let rl_prompt_limit = study.policy.max_length.saturating_sub(completion_limit).max(8);
            let eval_every = study.evaluation.eval_every;
            let eval_problems = &test[..study.evaluation.train_eval_size.min(test.len())];
            let mut eval_seconds = 0.0;
            // Seconds spent writing checkpoints, which are not training either.
            let mut checkpoint_seconds = 0.0;
            let train_seconds =
                |not_training: f64| earlier_train_seconds + started.elapsed().as_secs_f64() - not_training;
            if eval_every > 0 && resume.is_none() {
                // Step 0: the held-out accuracy the training starts from, so curves begin at the base.
                let eval_started = Instant::now();
                let before =
                    evaluate(study, &algorithm.policy().valid(), tokenizer, &builder, eval_problems, progress)?;
                let mut row = rl_algos::Metrics::new();
                row.insert("step".to_string(), 0.0);
                row.insert("eval/accuracy_lenient".to_string(), before.accuracy.lenient.accuracy);
                row.insert("eval/accuracy_strict".to_string(), before.accuracy.strict.accuracy);
                metrics_file.push(&row)?;
                history.push(row);
                eval_seconds += eval_started.elapsed().as_secs_f64();
            }
            // Ctrl-C from here on ends the step, writes a checkpoint and stops the cell.
            let interrupt = checkpoint::InterruptGuard::install();
            for step in first_step..=*steps {
                let prompts: Vec<PromptItem> = (0..*prompts_per_step)
                    .map(|_| {
                        let problem = &task.train.problems[rng.random_range(0..task.train.len())];
                        let text = builder.render(&problem.question)?;
                        let prompt_ids = fit(
                            encode_prompt(tokenizer, &builder, &text)?,
                            rl_prompt_limit,
                            tokenizer.prepended_bos().map(i64::from),
                        );
                        Ok(PromptItem { prompt_ids, prompt_text: text, answer: problem.answer.clone() })
                    })
                    .collect::<anyhow::Result<_>>()?;
                let mut row = match algorithm.train_step(&prompts, &environment) {
                    Ok(row) => row,
                    // The algorithm names the step itself; a NaN or infinite loss or gradient
                    // norm is divergence, not a failure of the study.
                    Err(rl_algos::RlError::NotFinite { step, quantity, value }) => {
                        let reason = format!(
                            "step {step}: the {quantity} is {value}; lower methods.{}.optim.learning_rate or set its max_grad_norm",
                            cell.method
                        );
                        return Ok(unfinished_summary(
                            cell,
                            CellStatus::Diverged,
                            reason,
                            train_seconds(eval_seconds + checkpoint_seconds),
                        ));
                    }
                    Err(error) => return Err(anyhow::Error::new(error).context(format!("step {step}"))),
                };
                row.insert("step".to_string(), step as f64);
                if let Some(why) = divergence(&row, weight_norm) {
                    // The row that shows it is kept; the model is not evaluated (it is no result).
                    metrics_file.push(&row)?;
                    // Clipping bounds the gradient, not AdamW's step (about the learning rate per
                    // weight): the learning rate is the fix.
                    let reason = format!("step {step}: {why}; lower methods.{}.optim.learning_rate", cell.method);
                    return Ok(unfinished_summary(
                        cell,
                        CellStatus::Diverged,
                        reason,
                        train_seconds(eval_seconds + checkpoint_seconds),
                    ));
                }
                if eval_every > 0 && (step % eval_every == 0 || step == *steps) {
                    // Held-out accuracy during training (not counted as training time).
                    let eval_started = Instant::now();
                    let during =
                        evaluate(study, &algorithm.policy().valid(), tokenizer, &builder, eval_problems, progress)?;
                    row.insert("eval/accuracy_lenient".to_string(), during.accuracy.lenient.accuracy);
                    row.insert("eval/accuracy_strict".to_string(), during.accuracy.strict.accuracy);
                    eval_seconds += eval_started.elapsed().as_secs_f64();
                }
                let reward = row.get("reward").copied().unwrap_or(f64::NAN);
                bar.set_message(format!("reward {reward:.3}"));
                metrics_file.push(&row)?;
                history.push(row);
                bar.inc(1);
                let interrupted = interrupt.requested();
                if interrupted || (study.checkpoint_every > 0 && step % study.checkpoint_every == 0) {
                    let writing = Instant::now();
                    let seconds =
                        (train_seconds(eval_seconds + checkpoint_seconds), earlier_eval_seconds + eval_seconds);
                    let state = checkpoint::RunnerState::new(
                        step,
                        method_value.clone(),
                        &rng,
                        seconds.0,
                        seconds.1,
                        &history,
                        &samples_before,
                    );
                    checkpoint::write(cell_dir, algorithm.as_ref(), &state)?;
                    checkpoint_seconds += writing.elapsed().as_secs_f64();
                }
                if interrupted {
                    return Err(checkpoint::Interrupted { step, cell: cell.id() }.into());
                }
            }
            drop(interrupt);
            drop(bar);
            let seconds = train_seconds(eval_seconds + checkpoint_seconds);
            let trained = algorithm.into_policy().valid();
            if study.policy.lora.is_some() {
                // The trained policy of a LoRA cell, small enough to keep: PEFT loads it over the base.
                trained.save_adapters(
                    &cell_dir.join(policy_models::lora::ADAPTER_SUBDIR),
                    Some(&base_model_name(study, base_dir)),
                )?;
            }
            (trained, *few_shot_k, seconds, history)
        }
    };
    let builder = prompt_builder(study, task, base_dir, k, cell.seed)?;
    let evaluation = evaluate(study, &policy, tokenizer, &builder, test, progress)?;
    let accuracy_maj = if study.evaluation.maj_k > 0 {
        Some(majority_accuracy(study, &policy, tokenizer, &builder, test, cell.seed, progress)?)
    } else {
        None
    };
    let mut lines = String::new();
    for (stage, sample) in samples_before
        .iter()
        .map(|s| ("before", s))
        .chain(evaluation.samples.iter().take(sample_questions.len()).map(|s| ("after", s)))
    {
        let mut value = serde_json::to_value(sample)?;
        value["stage"] = serde_json::Value::from(stage);
        lines.push_str(&serde_json::to_string(&value)?);
        lines.push('\n');
    }
    write_atomically(&cell_dir.join("samples.jsonl"), lines.as_bytes())?;
    // Training steps only (the step-0 row holds the held-out accuracy before training).
    let trained: Vec<&rl_algos::Metrics> =
        metrics.iter().filter(|m| m.get("step").is_none_or(|step| *step >= 1.0)).collect();
    let rewards: Vec<f64> = trained.iter().map(|m| m.get("reward").copied().unwrap_or(f64::NAN)).collect();
    let steps: Vec<u64> = trained
        .iter()
        .enumerate()
        .map(|(index, m)| m.get("step").map_or(index as u64 + 1, |step| *step as u64))
        .collect();
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
pub(crate) fn divergence(row: &rl_algos::Metrics, weight_norm: f64) -> Option<String> {
    let watched =
        |name: &str| name == "loss" || name.starts_with("loss/") || name == "grad_norm" || name == "update_norm";
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
pub(crate) fn parameter_norm(model: &CausalLm) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rl_algos::rewards::RewardInput;

    /// Rewards that differ within a group, so every method gets a gradient.
    struct ByteSum;
    impl RewardFunction for ByteSum {
        fn name(&self) -> &str {
            "byte_sum"
        }
        fn score(&self, batch: &[RewardInput<'_>]) -> Vec<f32> {
            // By content, not length: every completion here runs to the length limit.
            batch.iter().map(|input| (input.completion.bytes().map(u32::from).sum::<u32>() % 5) as f32).collect()
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
            format!(
                "name = \"t\"\n[task]\nkind = \"synthetic\"\n[policy]\ntemplate = \"plain\"\n{lora}\n[policy.base]\nkind = \"preset\"\npreset = \"tiny_gpt_neo\"\n[reward_sources.rules]\nrules = [{{ kind = \"strict_correct\", format = \"gsm8k_marker\" }}]\n[methods.grpo]\nkind = \"rl\"\nalgorithm = \"grpo\"\nreward_sources = [\"rules\"]\nsteps = 1\n"
            )
        };
        let lora: Study = toml::from_str(&text("lora = { rank = 2, alpha = 4.0 }")).unwrap();
        let full: Study = toml::from_str(&text("")).unwrap();
        assert_eq!(lora.policy.lora.as_ref().map(|l| (l.rank, l.alpha)), Some((2, 4.0)));
        let rewards = WeightedRewards::new(vec![(Box::new(ByteSum) as Box<dyn RewardFunction>, 1.0)]);
        let decode = |ids: &[i64]| ids.iter().map(|id| char::from(b'a' + (id % 26) as u8)).collect::<String>();
        let environment = Environment {
            decode: &decode,
            eos_token_ids: vec![],
            pad_token_id: 0,
            stop_strings: vec![],
            rewards: &rewards,
        };
        let prompts: Vec<PromptItem> = (0..2)
            .map(|i| PromptItem { prompt_ids: vec![1 + i, 2, 3], prompt_text: String::new(), answer: "1".into() })
            .collect();
        let probe = policy_models::StepInput::from_padded(&[vec![1, 2, 3]], &[vec![true; 3]]);
        let logits = |model: &CausalLm| {
            model.valid().forward(&probe, &mut model.new_cache()).into_data().try_to_vec::<f32>().unwrap()
        };
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
                let mut trainer =
                    (entry.build)(AlgorithmInputs { policy, config: config.clone(), optim: optim.clone(), seed: 5 })
                        .unwrap();
                let metrics = trainer.train_step(&prompts, &environment).unwrap();
                assert!(metrics["grad_norm"] > 0.0, "{algorithm}: no gradient: {metrics:?}");
                (before, trainer.into_policy())
            };
            let (before, tuned) = step(&lora);
            let after = policy_models::optim::parameter_values(&tuned);
            let is_adapter = |path: &str| path.ends_with(".lora.a") || path.ends_with(".lora.b");
            assert!(
                before.keys().filter(|path| is_adapter(path)).count() >= 12,
                "{algorithm}: adapters on every projection: {:?}",
                before.keys()
            );
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
            assert!(
                full_before.iter().any(|(path, values)| path.ends_with("query.weight") && values != &full_after[path]),
                "{algorithm}: full fine-tuning moves the base"
            );
            assert_ne!(logits(&tuned), logits(&full_tuned), "{algorithm}: the LoRA update equals full fine-tuning's");
        }
    }

    #[test]
    fn divergence_is_a_non_finite_quantity_or_an_update_larger_than_the_weights() {
        let row = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<rl_algos::Metrics>();
        assert_eq!(
            divergence(&row(&[("loss", 0.3), ("grad_norm", 2.0), ("update_norm", 0.5), ("reward", f64::NAN)]), 10.0),
            None
        );
        assert_eq!(divergence(&row(&[("loss", 0.3)]), 10.0), None, "no update_norm, nothing to judge");
        assert_eq!(
            divergence(&row(&[("loss/policy", f64::INFINITY), ("update_norm", 0.5)]), 10.0).as_deref(),
            Some("loss/policy is inf")
        );
        assert_eq!(divergence(&row(&[("grad_norm", f64::NAN)]), 10.0).as_deref(), Some("grad_norm is NaN"));
        let why = divergence(&row(&[("loss", 0.3), ("update_norm", 10.5)]), 10.0).unwrap();
        assert!(why.starts_with("update_norm 1.0500e1 exceeds 1 x the norm") && why.contains("(1.0000e1)"), "{why}");
        assert_eq!(divergence(&row(&[("update_norm", 9.9)]), 10.0), None);
    }
}
