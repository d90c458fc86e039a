//! `cargo xtask bench --model <dir|gguf|hub id> --workload grpo|generate|train`: a real
//! checkpoint at the size, beside TRL / transformers on the same settings
//! (`tools/bench/trl_grpo.py`, run as a child process after cotlab's side, never concurrently).
//!
//! The prompts are GSM8K test questions, in file order, posed with the TRL GRPO demo's
//! `xml_reasoning` system prompt through the checkpoint's chat template; both sides read the
//! same file and take the same questions (step `s` uses questions `s*P .. (s+1)*P`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use policy_models::generate::{GenerationConfig, Sampler, generate};
use policy_models::train::{SftConfig, SftExample, SftTrainer};
use policy_models::{BackendKind, CausalLm, LoraSettings, ModelSource, PolicyTokenizer};
use prompting::{PromptBuilder, Template};
use rl_algos::rewards::{RewardFunction, RewardKind, WeightedRewards};
use rl_algos::{AlgorithmInputs, Environment, OptimSettings, PromptItem};
use serde::Serialize;
use tasks::Problem;

use super::flops;
use crate::common::ComputeDtype;
use crate::study::config::registry;
use crate::study::prompts::encode_prompt;
use policy_models::optim::TrainDtype;

/// What is measured on the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// GRPO training steps through the algorithm registry, as the study runner drives them.
    Grpo,
    /// Sampling only: prompts x generations rows, every row generating all new tokens.
    Generate,
    /// Forward + backward + AdamW on fixed sequences of the GRPO update's shape.
    Train,
}

impl Workload {
    /// The name the CLI and the JSON use.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Grpo => "grpo",
            Workload::Generate => "generate",
            Workload::Train => "train",
        }
    }
}

/// The settings of one measurement; `config` in the JSON, and the reference script's arguments.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchConfig {
    /// The checkpoint reference as given (a directory, a `.gguf` file or a hub id).
    pub model: String,
    /// The workload.
    pub workload: Workload,
    /// Distinct prompts per step.
    pub prompts_per_step: usize,
    /// Completions per prompt (GRPO's group size; the generate and train workloads' rows per prompt).
    pub num_generations: usize,
    /// Most tokens per completion (generate and train: exactly this many).
    pub max_completion_length: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// AdamW's learning rate (constant).
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// GRPO's loss aggregation.
    pub loss_type: String,
    /// GRPO's KL weight (0: no reference model).
    pub beta: f64,
    /// Steps measured, the first of them a warm-up.
    pub steps: usize,
    /// Micro-batches per optimizer step; unset: one for TRL (its default), cotlab's token
    /// budget for cotlab (`max_tokens_per_micro_batch`).
    pub grad_accum: Option<usize>,
    /// GRPO: cotlab runs each prompt once in its training forwards (`share_prompt_prefix`).
    pub share_prompt_prefix: bool,
    /// CPU threads of each side (rayon's pool; torch.set_num_threads).
    pub threads: usize,
    /// `f32` or `bf16` (generation on bf16 weights; training on f32 master weights with bf16
    /// passes, see `TrainDtype`).
    pub dtype: String,
    /// LoRA rank (alpha = 2 x rank, every attention and MLP projection), or null: full fine-tuning.
    pub lora: Option<usize>,
    /// The GSM8K file the questions come from.
    pub data: PathBuf,
    /// cotlab's burn backend.
    pub backend: String,
}

impl BenchConfig {
    /// Rows per step: prompts x generations.
    pub fn rows(&self) -> usize {
        self.prompts_per_step * self.num_generations
    }

    /// Micro-batches per step on the reference's side: `--grad-accum` when given; else TRL's
    /// default `per_device_train_batch_size` of 8 for GRPO (one micro-batch when 8 does not
    /// divide the step's completions), one for the other workloads.
    pub fn reference_grad_accum(&self) -> usize {
        const TRL_PER_DEVICE_BATCH: usize = 8;
        match self.grad_accum {
            Some(steps) => steps,
            None if self.workload == Workload::Grpo && self.rows().is_multiple_of(TRL_PER_DEVICE_BATCH) => {
                self.rows() / TRL_PER_DEVICE_BATCH
            }
            None => 1,
        }
    }

    /// Checks the settings together; each message names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.prompts_per_step >= 1, "--prompts must be at least 1");
        anyhow::ensure!(self.num_generations >= 1, "--generations must be at least 1");
        anyhow::ensure!(
            self.workload != Workload::Grpo || self.num_generations >= 2,
            "--generations {}: GRPO compares completions within a group; use at least 2",
            self.num_generations
        );
        anyhow::ensure!(self.max_completion_length >= 1, "--new-tokens must be at least 1");
        anyhow::ensure!(
            self.steps >= 1,
            "--steps must be at least 1 (the first step is a warm-up: use 2 or more for a median)"
        );
        if let Some(grad_accum) = self.grad_accum {
            anyhow::ensure!(
                grad_accum >= 1 && self.rows().is_multiple_of(grad_accum),
                "--grad-accum {grad_accum} must divide prompts x generations = {} (TRL's per-device batch is their quotient)",
                self.rows()
            );
        }
        anyhow::ensure!(self.lora != Some(0), "--lora-rank must be at least 1 (omit it for full fine-tuning)");
        Ok(())
    }
}

/// One side's figures: cotlab's, and the reference script prints the same keys.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// GRPO: median seconds of the steps after the first (the only step's with `--steps 1`).
    pub grpo_step_seconds: Option<f64>,
    /// Sampled tokens per second (generate workload), rows x new tokens over the median run.
    pub gen_tokens_per_s: Option<f64>,
    /// Tokens through forward + backward + AdamW per second (train workload), prompt and
    /// completion positions alike, over the median step.
    pub train_tokens_per_s: Option<f64>,
    /// Peak resident memory of the process (`VmHWM`), model loading included.
    pub peak_rss_bytes: Option<u64>,
    /// cotlab: the most bytes the program held allocated at once; the rest of the peak RSS is
    /// what the allocator kept for reuse, the binary and the loaded files' pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_heap_bytes: Option<u64>,
    /// cotlab, train: the best f32 2048 x 2048 x 2048 product in this process, GFLOP/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matmul_peak_gflops: Option<f64>,
    /// cotlab, train in bf16: the same for the bf16 product the passes use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bf16_matmul_peak_gflops: Option<f64>,
    /// cotlab, train: the median step's matrix-product GFLOP/s ([`flops::training_step_flops`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_gflops: Option<f64>,
    /// Seconds of every step or run, the warm-up first.
    pub step_seconds: Vec<f64>,
    /// GRPO: seconds of each step's update phase (scoring, backward passes, optimizer), the
    /// warm-up first; the rest of a step is sampling and rewards.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub update_seconds: Vec<f64>,
    /// GRPO: mean completion length over the measured steps (both sides should sample alike).
    pub completion_mean_length: Option<f64>,
    /// GRPO: mean reward over the measured steps.
    pub reward_mean: Option<f64>,
    /// The settings measured.
    pub config: BenchConfig,
}

/// Runs `config`'s workload on cotlab; `config.threads` must already be rayon's pool size.
pub fn measure(config: &BenchConfig) -> anyhow::Result<Figures> {
    config.validate()?;
    let backend: BackendKind =
        config.backend.parse().map_err(|error| anyhow::anyhow!("--backend {}: {error}", config.backend))?;
    let device = backend.device()?;
    let dir = ModelSource::parse(&config.model)?.resolve()?;
    let tokenizer = PolicyTokenizer::load_dir(&dir)
        .with_context(|| format!("the benchmark needs the tokenizer of {}", dir.display()))?;
    let chat = prompting::ChatTemplate::from_dir(&dir)
        .with_context(|| format!("the benchmark poses questions through the chat template of {}", dir.display()))?;
    let builder = PromptBuilder::new(Template::XmlReasoning).with_chat_template(chat, serde_json::Map::new());
    let problems = tasks::gsm8k::read_jsonl(&config.data, tasks::Split::Test, tasks::gsm8k::Gsm8kOptions::default())
        .with_context(|| format!("reading the benchmark's questions from {} (--data)", config.data.display()))?
        .problems;
    let needed = config.prompts_per_step * config.steps;
    anyhow::ensure!(
        problems.len() >= needed,
        "{} has {} questions; --prompts x --steps needs {needed}",
        config.data.display(),
        problems.len()
    );
    let prompts: Vec<PromptItem> = problems[..needed]
        .iter()
        .map(|problem| {
            let text = builder.render(&problem.question)?;
            Ok(PromptItem {
                prompt_ids: encode_prompt(&tokenizer, &builder, &text)?,
                prompt_text: text,
                answer: problem.answer.clone(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let dtype = if config.dtype == "bf16" { ComputeDtype::Bf16 } else { ComputeDtype::F32 };
    // Generation computes on bf16 weights; training keeps f32 master weights and computes on a
    // bf16 copy of them (TrainDtype), as TRL's `bf16=True` does under autocast.
    let train_dtype = match dtype {
        ComputeDtype::F32 => TrainDtype::F32,
        ComputeDtype::Bf16 => TrainDtype::Bf16,
    };
    let load = |device: &burn::tensor::Device, training: bool| -> anyhow::Result<CausalLm> {
        let policy = CausalLm::load_dir(&dir, device).with_context(|| format!("loading {}", dir.display()))?;
        Ok(match dtype {
            ComputeDtype::Bf16 if !training => policy.with_compute_dtype(burn::tensor::FloatDType::BF16),
            _ => policy,
        })
    };
    let pad = tokenizer.pad_id.map_or(0, i64::from);
    let mut figures = Figures {
        grpo_step_seconds: None,
        gen_tokens_per_s: None,
        train_tokens_per_s: None,
        peak_rss_bytes: None,
        peak_heap_bytes: None,
        matmul_peak_gflops: None,
        bf16_matmul_peak_gflops: None,
        train_gflops: None,
        step_seconds: Vec::new(),
        update_seconds: Vec::new(),
        completion_mean_length: None,
        reward_mean: None,
        config: config.clone(),
    };
    match config.workload {
        Workload::Grpo => {
            let autodiff = device.clone().autodiff();
            let mut policy = load(&autodiff, true)?;
            if let Some(rank) = config.lora {
                autodiff.seed(0);
                policy = policy
                    .with_lora(&LoraSettings { rank, alpha: 2.0 * rank as f64, ..LoraSettings::default() })
                    .map_err(|error| anyhow::anyhow!("--lora-rank: {error}"))?;
            }
            let mut grpo = serde_json::json!({
                "num_generations": config.num_generations,
                "max_completion_length": config.max_completion_length,
                "temperature": config.temperature,
                "loss_type": config.loss_type,
                "beta": config.beta,
                "share_prompt_prefix": config.share_prompt_prefix,
            });
            if let Some(steps) = config.grad_accum {
                grpo["gradient_accumulation_steps"] = steps.into();
            }
            let entry = registry().iter().find(|entry| entry.name == "grpo").context("grpo is not registered")?;
            let adamw = policy_models::optim::AdamWSettings { weight_decay: config.weight_decay, ..Default::default() };
            let optim = OptimSettings {
                learning_rate: config.learning_rate,
                adamw,
                dtype: train_dtype,
                ..OptimSettings::default()
            };
            let optim = entry
                .run_optim(&grpo, &optim, config.steps as u64, config.prompts_per_step)
                .map_err(anyhow::Error::msg)?;
            let mut algorithm = (entry.build)(AlgorithmInputs { policy, config: grpo, optim, seed: 0 })?;
            // The TRL GRPO demo's format reward and correctness. A flat group (all rewards 0 when
            // no completion writes the tags) still goes through forward, backward and the
            // optimizer step (zero_std_groups = keep, as TRL), so the work per step is the same.
            let rewards = WeightedRewards::new(vec![
                (Box::new(RewardKind::XmlCount) as Box<dyn RewardFunction>, 1.0),
                (Box::new(RewardKind::XmlCorrectness) as Box<dyn RewardFunction>, 1.0),
            ]);
            let decode = |ids: &[i64]| {
                tokenizer.decode(&ids.iter().map(|&id| id as u32).collect::<Vec<_>>(), true).unwrap_or_default()
            };
            let environment = Environment {
                decode: &decode,
                eos_token_ids: tokenizer.eos_ids.iter().map(|&id| i64::from(id)).collect(),
                pad_token_id: pad,
                // TRL stops at the end-of-sequence token only; stop strings would sample fewer tokens than it does.
                stop_strings: Vec::new(),
                rewards: &rewards,
            };
            let mut lengths = Vec::new();
            let mut rewards_seen = Vec::new();
            for (step, batch) in prompts.chunks(config.prompts_per_step).enumerate() {
                let started = Instant::now();
                let metrics =
                    algorithm.train_step(batch, &environment).with_context(|| format!("GRPO step {}", step + 1))?;
                figures.step_seconds.push(started.elapsed().as_secs_f64());
                figures.update_seconds.extend(metrics.get("update_time").copied());
                if step > 0 || config.steps == 1 {
                    lengths.extend(metrics.get("completions/mean_length").copied());
                    rewards_seen.extend(metrics.get("reward").copied());
                }
            }
            figures.grpo_step_seconds = Some(median_after_warmup(&figures.step_seconds));
            figures.completion_mean_length = mean(&lengths);
            figures.reward_mean = mean(&rewards_seen);
        }
        Workload::Generate => {
            let model = load(&device, false)?;
            let generation_config = GenerationConfig {
                max_new_tokens: config.max_completion_length,
                sampler: Sampler::Sample { temperature: config.temperature, top_k: None, top_p: None },
                // No end-of-sequence token: every row samples every token (transformers' `min_new_tokens`).
                eos_token_ids: vec![],
                pad_token_id: pad,
                seed: 0,
            };
            for (step, batch) in prompts.chunks(config.prompts_per_step).enumerate() {
                let rows: Vec<Vec<i64>> = batch
                    .iter()
                    .flat_map(|item| std::iter::repeat_n(item.prompt_ids.clone(), config.num_generations))
                    .collect();
                let started = Instant::now();
                let generation = generate(
                    &model,
                    &rows,
                    &GenerationConfig { seed: step as u64, ..generation_config.clone() },
                    &[],
                    None,
                );
                figures.step_seconds.push(started.elapsed().as_secs_f64());
                anyhow::ensure!(
                    generation.completion_ids.iter().all(|row| row.len() == config.max_completion_length),
                    "generation stopped early"
                );
            }
            figures.gen_tokens_per_s = Some(
                (config.rows() * config.max_completion_length) as f64 / median_after_warmup(&figures.step_seconds),
            );
        }
        Workload::Train => {
            // Each prompt followed by its gold XML answer, cycled or cut to exactly
            // max_completion_length tokens, repeated num_generations times: the shape of a GRPO update.
            let examples_of = |batch: &[PromptItem], problems: &[Problem]| -> anyhow::Result<Vec<SftExample>> {
                let mut examples = Vec::new();
                for (item, problem) in batch.iter().zip(problems) {
                    let response: Vec<i64> =
                        tokenizer.encode(&builder.target(problem), false)?.into_iter().map(i64::from).collect();
                    anyhow::ensure!(!response.is_empty(), "the gold answer of {} encodes to no tokens", problem.id);
                    let completion_ids: Vec<i64> =
                        response.iter().copied().cycle().take(config.max_completion_length).collect();
                    for _ in 0..config.num_generations {
                        examples.push(SftExample {
                            prompt_ids: item.prompt_ids.clone(),
                            completion_ids: completion_ids.clone(),
                        });
                    }
                }
                Ok(examples)
            };
            let mut policy = load(&device.clone().autodiff(), true)?;
            if let Some(rank) = config.lora {
                device.clone().autodiff().seed(0);
                policy = policy
                    .with_lora(&LoraSettings { rank, alpha: 2.0 * rank as f64, ..LoraSettings::default() })
                    .map_err(|error| anyhow::anyhow!("--lora-rank: {error}"))?;
            }
            let steps = config.steps as u64;
            let adamw = policy_models::optim::AdamWSettings { weight_decay: config.weight_decay, ..Default::default() };
            let sft = SftConfig {
                steps,
                batch_size: config.rows(),
                schedule: policy_models::optim::Schedule {
                    learning_rate: config.learning_rate,
                    warmup_steps: 0,
                    total_steps: steps,
                    min_lr_ratio: 1.0,
                },
                adamw,
                max_grad_norm: Some(1.0),
                checkpoint_every: 0,
                seed: 0,
                pad_token_id: pad,
                max_tokens_per_micro_batch: policy_models::train::DEFAULT_MAX_TOKENS_PER_MICRO_BATCH,
                dtype: train_dtype,
            };
            let mut trainer = SftTrainer::new(policy, sft);
            let (mut tokens, mut flop_counts) = (Vec::new(), Vec::new());
            for (batch, questions) in
                prompts.chunks(config.prompts_per_step).zip(problems.chunks(config.prompts_per_step))
            {
                let examples = examples_of(batch, questions)?;
                tokens.push(
                    examples
                        .iter()
                        .map(|example| example.prompt_ids.len() + example.completion_ids.len())
                        .sum::<usize>() as f64,
                );
                let lengths: Vec<usize> =
                    examples.iter().map(|example| example.prompt_ids.len() + example.completion_ids.len()).collect();
                let loss_positions = examples.iter().map(|example| example.completion_ids.len()).sum();
                flop_counts.push(flops::training_step_flops(
                    trainer.model(),
                    &lengths,
                    loss_positions,
                    config.lora.is_some(),
                ));
                let started = Instant::now();
                trainer.train_step(&examples)?;
                figures.step_seconds.push(started.elapsed().as_secs_f64());
            }
            let rates: Vec<f64> =
                tokens.iter().zip(&figures.step_seconds).map(|(tokens, seconds)| tokens / seconds).collect();
            figures.train_tokens_per_s = Some(median_after_warmup(&rates));
            let step_flops: Vec<f64> =
                flop_counts.iter().zip(&figures.step_seconds).map(|(f, s)| f / s / 1e9).collect();
            figures.train_gflops = Some(median_after_warmup(&step_flops));
            figures.matmul_peak_gflops = Some(flops::matmul_peak_gflops(&device, burn::tensor::FloatDType::F32));
            if config.dtype == "bf16" {
                figures.bf16_matmul_peak_gflops =
                    Some(flops::matmul_peak_gflops(&device, burn::tensor::FloatDType::BF16));
            }
        }
    }
    figures.peak_rss_bytes = peak_rss_bytes();
    figures.peak_heap_bytes = Some(crate::heap::peak_bytes() as u64);
    Ok(figures)
}

/// The median of `values` after the first (a warm-up); the only value when there is one.
pub fn median_after_warmup(values: &[f64]) -> f64 {
    let mut measured: Vec<f64> = if values.len() > 1 { values[1..].to_vec() } else { values.to_vec() };
    measured.sort_by(f64::total_cmp);
    match measured.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => measured[n / 2],
        n => (measured[n / 2 - 1] + measured[n / 2]) / 2.0,
    }
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// This process's peak resident memory, `VmHWM` in `/proc/self/status` (Linux only).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kilobytes: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kilobytes * 1024)
}

/// Runs `tools/bench/trl_grpo.py` on `config` with `$COTLAB_PYTHON` (else `python3`); its one
/// JSON line, or why there is none.
pub fn reference(config: &BenchConfig) -> Result<serde_json::Value, String> {
    let python = std::env::var("COTLAB_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench/trl_grpo.py");
    let mut args = reference_args(config);
    // A GGUF file is handed over as the directory cotlab converted it into: both sides then read
    // the same f32 weights, through the same tokenizer files.
    if let Ok(source @ ModelSource::Gguf(_)) = ModelSource::parse(&config.model)
        && let Ok(dir) = source.resolve()
    {
        args[1] = dir.display().to_string();
    }
    let output =
        Command::new(&python).arg(&script).args(args).stderr(std::process::Stdio::inherit()).output().map_err(
            |error| {
                format!("cannot run {python} (set COTLAB_PYTHON to a Python with torch, transformers and trl): {error}")
            },
        )?;
    if !output.status.success() {
        return Err(format!("{} {} exited with {} (its messages are above)", python, script.display(), output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with('{'))
        .ok_or_else(|| format!("{} printed no JSON line", script.display()))?;
    serde_json::from_str(line).map_err(|error| format!("{}: its JSON line is unreadable: {error}", script.display()))
}

/// The reference script's arguments for `config`.
pub fn reference_args(config: &BenchConfig) -> Vec<String> {
    let mut args: Vec<String> = [
        ("--model", config.model.clone()),
        ("--workload", config.workload.name().to_string()),
        ("--data", config.data.display().to_string()),
        ("--prompts", config.prompts_per_step.to_string()),
        ("--generations", config.num_generations.to_string()),
        ("--new-tokens", config.max_completion_length.to_string()),
        ("--temperature", config.temperature.to_string()),
        ("--learning-rate", config.learning_rate.to_string()),
        ("--weight-decay", config.weight_decay.to_string()),
        ("--loss-type", config.loss_type.clone()),
        ("--beta", config.beta.to_string()),
        ("--steps", config.steps.to_string()),
        ("--grad-accum", config.reference_grad_accum().to_string()),
        ("--threads", config.threads.to_string()),
        ("--dtype", config.dtype.clone()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    if let Some(rank) = config.lora {
        args.extend(["--lora-rank".to_string(), rank.to_string()]);
    }
    args
}

/// The whole result: both sides, the machine, and what cotlab's speed is relative to the reference.
#[derive(Debug, Serialize)]
pub struct Report {
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub date: String,
    /// `git rev-parse --short HEAD` of the tree, `+` appended when it has uncommitted changes.
    pub commit: Option<String>,
    /// The CPU model and the threads used.
    pub machine: Machine,
    /// The command that produced it.
    pub command: String,
    /// cotlab's figures.
    pub cotlab: Figures,
    /// The reference's JSON line (null with `--no-torch` or when it failed).
    pub reference: Option<serde_json::Value>,
    /// Why there is no reference, when there is none.
    pub reference_error: Option<String>,
    /// Reference time over cotlab time for the workload's figure (above 1: cotlab is faster).
    pub speedup: Option<f64>,
}

/// Where the benchmark ran.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `/proc/cpuinfo`'s model name.
    pub cpu: Option<String>,
    /// Threads each side used.
    pub threads: usize,
    /// The CPU's SIMD features that matter to the kernels (`avx512bf16` and `amx-bf16` say
    /// whether bf16 products run natively).
    pub features: Vec<String>,
}

impl Report {
    /// cotlab's speed over the reference's on the workload's own figure.
    pub fn speedup(cotlab: &Figures, reference: Option<&serde_json::Value>) -> Option<f64> {
        let reference = reference?;
        match cotlab.config.workload {
            Workload::Grpo => Some(reference["grpo_step_seconds"].as_f64()? / cotlab.grpo_step_seconds?),
            Workload::Generate => Some(cotlab.gen_tokens_per_s? / reference["gen_tokens_per_s"].as_f64()?),
            Workload::Train => Some(cotlab.train_tokens_per_s? / reference["train_tokens_per_s"].as_f64()?),
        }
    }

    /// The side-by-side table.
    pub fn render(&self) -> String {
        let c = &self.cotlab.config;
        let lora = c.lora.map_or("none".to_string(), |rank| format!("rank {rank}"));
        let mut text = format!(
            "cotlab bench --model {} --workload {}\n  {} prompts x {} completions, max_completion_length {}, temperature {}, learning_rate {:e}, loss_type {}, beta {}, {} steps (first = warm-up), grad_accum {}, {} threads, {}, LoRA {}, backend {}\n  machine: {} [{}], native bf16 products: {} ({}), commit {}, {}\n",
            c.model,
            c.workload.name(),
            c.prompts_per_step,
            c.num_generations,
            c.max_completion_length,
            c.temperature,
            c.learning_rate,
            c.loss_type,
            c.beta,
            c.steps,
            c.grad_accum.map_or_else(
                || format!("auto (cotlab: token budget; reference: {})", c.reference_grad_accum()),
                |n| n.to_string()
            ),
            c.threads,
            c.dtype,
            lora,
            c.backend,
            self.machine.cpu.as_deref().unwrap_or("unknown CPU"),
            self.machine.features.join(" "),
            if crate::study::provenance::native_bf16(&self.machine.features) { "yes" } else { "no" },
            self.date,
            self.commit.as_deref().unwrap_or("unknown"),
            if cfg!(debug_assertions) { "DEBUG build: not meaningful" } else { "release build" },
        );
        let theirs = |key: &str| self.reference.as_ref().and_then(|value| value[key].as_f64());
        let cell = |value: Option<f64>, digits: usize| value.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        let reference_name = if c.workload == Workload::Grpo { "TRL" } else { "transformers" };
        text.push_str(&format!("{:<34} {:>12} {:>12}\n", "", "cotlab", reference_name));
        let rows: [(&str, Option<f64>, Option<f64>, usize); 10] = [
            ("GRPO step seconds (median)", self.cotlab.grpo_step_seconds, theirs("grpo_step_seconds"), 2),
            ("generate tokens/s", self.cotlab.gen_tokens_per_s, theirs("gen_tokens_per_s"), 1),
            ("train tokens/s", self.cotlab.train_tokens_per_s, theirs("train_tokens_per_s"), 1),
            ("mean completion length", self.cotlab.completion_mean_length, theirs("completion_mean_length"), 1),
            ("mean reward", self.cotlab.reward_mean, theirs("reward_mean"), 3),
            (
                "peak RSS (GiB)",
                self.cotlab.peak_rss_bytes.map(|b| b as f64 / (1u64 << 30) as f64),
                theirs("peak_rss_bytes").map(|b| b / (1u64 << 30) as f64),
                2,
            ),
            ("peak heap (GiB)", self.cotlab.peak_heap_bytes.map(|b| b as f64 / (1u64 << 30) as f64), None, 2),
            ("train step GFLOP/s", self.cotlab.train_gflops, None, 1),
            ("f32 2048^3 matmul GFLOP/s", self.cotlab.matmul_peak_gflops, None, 1),
            ("bf16 2048^3 matmul GFLOP/s", self.cotlab.bf16_matmul_peak_gflops, None, 1),
        ];
        for (name, ours, reference, digits) in rows {
            if ours.is_some() || reference.is_some() {
                text.push_str(&format!("{name:<34} {:>12} {:>12}\n", cell(ours, digits), cell(reference, digits)));
            }
        }
        let steps = |values: &[f64]| values.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(", ");
        text.push_str(&format!("{:<34} {}\n", "cotlab step seconds", steps(&self.cotlab.step_seconds)));
        if !self.cotlab.update_seconds.is_empty() {
            text.push_str(&format!("{:<34} {}\n", "cotlab update seconds", steps(&self.cotlab.update_seconds)));
        }
        if let Some(values) = self.reference.as_ref().and_then(|value| value["step_seconds"].as_array()) {
            let values: Vec<f64> = values.iter().filter_map(serde_json::Value::as_f64).collect();
            text.push_str(&format!("{:<34} {}\n", format!("{reference_name} step seconds"), steps(&values)));
        }
        if let Some(versions) = self.reference.as_ref().map(|value| value["versions"].to_string()) {
            text.push_str(&format!("{:<34} {versions}\n", "reference versions"));
        }
        match (self.speedup, &self.reference_error) {
            (Some(speedup), _) => {
                text.push_str(&format!("cotlab is {speedup:.2}x the reference's speed (above 1: faster)\n"))
            }
            (None, Some(why)) => text.push_str(&format!("no reference: {why}\n")),
            (None, None) => {}
        }
        text
    }
}

/// Appends `report` as one JSON line to `path` (the committed record is
/// `reports/bench/models.jsonl`).
pub fn record(report: &Report, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} to record the run", path.display()))?;
    writeln!(file, "{}", serde_json::to_string(report)?).with_context(|| format!("cannot append to {}", path.display()))
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs()) as i64;
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", of_day / 3600, of_day % 3600 / 60, of_day % 60)
}

/// The source tree's commit, short, with `+` when it has uncommitted changes (from the same
/// lookup as a study's provenance).
pub fn commit() -> Option<String> {
    let build = crate::study::provenance::build();
    let short = build.commit?.chars().take(7).collect::<String>();
    Some(if build.modified == Some(true) { format!("{short}+") } else { short })
}

/// The default question file: `$COTLAB_SHARED/datasets/gsm8k/test.jsonl`, else the shared
/// directory beside the checkout's.
pub fn default_data() -> PathBuf {
    let shared = std::env::var_os("COTLAB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    shared.join("datasets/gsm8k/test.jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> PathBuf {
        std::env::var_os("COTLAB_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
    }

    /// A tiny random Llama with SmolLM2's tokenizer and chat template: the real code path, fast.
    fn tiny_model() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let device = burn::tensor::Device::flex();
        device.seed(0);
        let config = policy_models::presets::Preset::TinyLlama.config(49_152, 2, 512);
        CausalLm::init(&config, &device).unwrap().save_dir(dir.path(), None).unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
            std::fs::copy(shared().join("tokenizers/smollm2-instruct").join(file), dir.path().join(file)).unwrap();
        }
        dir
    }

    fn config(model: &Path, workload: Workload) -> BenchConfig {
        BenchConfig {
            model: model.display().to_string(),
            workload,
            prompts_per_step: 2,
            num_generations: 2,
            max_completion_length: 4,
            temperature: 1.0,
            learning_rate: 1e-6,
            weight_decay: 0.01,
            loss_type: "dapo".to_string(),
            beta: 0.0,
            steps: 1,
            grad_accum: None,
            share_prompt_prefix: true,
            threads: 2,
            dtype: "f32".to_string(),
            lora: None,
            data: shared().join("datasets/gsm8k/test.jsonl"),
            backend: "flex".to_string(),
        }
    }

    #[test]
    fn every_workload_runs_on_a_tiny_model_and_reports_its_keys() {
        let model = tiny_model();
        for workload in [Workload::Grpo, Workload::Generate, Workload::Train] {
            let figures = measure(&config(model.path(), workload)).unwrap();
            assert_eq!(figures.step_seconds.len(), 1, "{workload:?}");
            let json = serde_json::to_value(&figures).unwrap();
            for key in [
                "grpo_step_seconds",
                "gen_tokens_per_s",
                "train_tokens_per_s",
                "peak_rss_bytes",
                "step_seconds",
                "config",
            ] {
                assert!(json.get(key).is_some(), "{workload:?}: no {key} in {json}");
            }
            for key in [
                "model",
                "prompts_per_step",
                "num_generations",
                "max_completion_length",
                "temperature",
                "learning_rate",
                "loss_type",
                "beta",
                "steps",
                "threads",
                "dtype",
                "lora",
            ] {
                assert!(json["config"].get(key).is_some(), "{workload:?}: no config.{key} in {json}");
            }
            let figure = match workload {
                Workload::Grpo => "grpo_step_seconds",
                Workload::Generate => "gen_tokens_per_s",
                Workload::Train => "train_tokens_per_s",
            };
            assert!(json[figure].as_f64().is_some_and(|value| value > 0.0), "{workload:?}: {json}");
            assert!(json["peak_rss_bytes"].as_u64().is_some_and(|bytes| bytes > 0), "{json}");
            if workload == Workload::Grpo {
                assert!(figures.completion_mean_length.is_some_and(|length| (0.0..=4.0).contains(&length)), "{json}");
            }
        }
    }

    #[test]
    fn settings_are_checked_and_passed_to_the_reference_by_name() {
        let mut bad = config(Path::new("m"), Workload::Grpo);
        bad.num_generations = 1;
        assert!(bad.validate().unwrap_err().to_string().contains("--generations"));
        let mut bad = config(Path::new("m"), Workload::Grpo);
        bad.grad_accum = Some(3);
        assert!(bad.validate().unwrap_err().to_string().contains("--grad-accum 3"));
        let mut good = config(Path::new("m.gguf"), Workload::Grpo);
        good.lora = Some(8);
        let args = reference_args(&good);
        let value = |flag: &str| args.iter().position(|arg| arg == flag).map(|at| args[at + 1].as_str());
        assert_eq!(value("--model"), Some("m.gguf"));
        assert_eq!(value("--generations"), Some("2"));
        assert_eq!(value("--loss-type"), Some("dapo"));
        assert_eq!(value("--lora-rank"), Some("8"));
        assert_eq!(value("--learning-rate").map(|v| v.parse::<f64>().unwrap()), Some(1e-6));
    }

    #[test]
    fn medians_skip_the_warm_up_and_dates_are_civil() {
        assert_eq!(median_after_warmup(&[100.0, 3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_after_warmup(&[100.0, 1.0, 2.0]), 1.5);
        assert_eq!(median_after_warmup(&[7.0]), 7.0);
        let now = utc_now();
        assert!(now.len() == 20 && now.ends_with('Z') && now.starts_with("20"), "{now}");
    }

    #[test]
    fn the_speedup_reads_the_workloads_figure() {
        let mut figures = measure_free_figures(Workload::Grpo);
        figures.grpo_step_seconds = Some(10.0);
        assert_eq!(Report::speedup(&figures, Some(&serde_json::json!({"grpo_step_seconds": 25.0}))), Some(2.5));
        let mut figures = measure_free_figures(Workload::Generate);
        figures.gen_tokens_per_s = Some(300.0);
        assert_eq!(Report::speedup(&figures, Some(&serde_json::json!({"gen_tokens_per_s": 150.0}))), Some(2.0));
        assert_eq!(Report::speedup(&figures, None), None);
    }

    fn measure_free_figures(workload: Workload) -> Figures {
        Figures {
            grpo_step_seconds: None,
            gen_tokens_per_s: None,
            train_tokens_per_s: None,
            peak_rss_bytes: None,
            peak_heap_bytes: None,
            matmul_peak_gflops: None,
            bf16_matmul_peak_gflops: None,
            train_gflops: None,
            step_seconds: vec![],
            update_seconds: vec![],
            completion_mean_length: None,
            reward_mean: None,
            config: config(Path::new("m"), workload),
        }
    }
}
