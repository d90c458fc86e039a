//! `cargo xtask bench [--json]`: training and generation throughput of a tiny GPT-Neo on the
//! chosen backend, beside PyTorch + transformers on the same shapes (`tools/bench/torch_ref.py`,
//! run with the `python3` on PATH or `$COTLAB_PYTHON`; null where torch is not installed).
//! With `--model`, a real checkpoint at the issue's size instead, beside TRL (`model.rs`).
//!
//! Speed is only meaningful in a release build: from a debug build this command re-runs itself
//! with `cargo run --release`.

mod flops;
mod model;

use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use policy_models::generate::{GenerationConfig, Sampler, generate};
use policy_models::optim::{AdamWSettings, Schedule};
use policy_models::presets::Preset;
use policy_models::train::{SftConfig, SftExample, SftTrainer};
use policy_models::{BackendKind, CausalLm};
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Print JSON with the keys listed in `docs/performance.md`.
    #[arg(long)]
    json: bool,
    /// The model shape: tiny-gpt-neo (d=128) or small-gpt-neo (d=256), 4 layers each.
    #[arg(long, default_value = "tiny-gpt-neo")]
    preset: String,
    /// The burn backend.
    #[arg(long, default_value = "flex")]
    backend: BackendKind,
    /// Timed training steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    train_steps: usize,
    /// Skip the PyTorch reference.
    #[arg(long)]
    no_torch: bool,
    /// Measure even in a debug build (numbers are then not meaningful).
    #[arg(long)]
    allow_debug: bool,
    /// Benchmark this checkpoint instead of the tiny presets: a directory in the Hugging Face
    /// layout, a `.gguf` file, or a hub id `owner/name[@revision]`.
    #[arg(long)]
    model: Option<String>,
    /// With --model: GRPO steps (beside TRL's GRPOTrainer), sampling only, or forward + backward
    /// + AdamW on fixed sequences (beside transformers).
    #[arg(long, value_enum, default_value = "grpo", requires = "model")]
    workload: model::Workload,
    /// With --model: distinct prompts (GSM8K test questions) per step.
    #[arg(long, default_value_t = 8, requires = "model")]
    prompts: usize,
    /// With --model: completions per prompt (GRPO's num_generations).
    #[arg(long, default_value_t = 8, requires = "model")]
    generations: usize,
    /// With --model: most tokens per completion (max_completion_length; generate and train: exactly this many).
    #[arg(long, default_value_t = 64, requires = "model")]
    new_tokens: usize,
    /// With --model: steps measured, the first a warm-up.
    #[arg(long, default_value_t = 3, requires = "model")]
    steps: usize,
    /// With --model: train LoRA adapters of this rank (alpha = 2 x rank) instead of every weight.
    #[arg(long, requires = "model")]
    lora_rank: Option<usize>,
    /// With --model: micro-batches per optimizer step on both sides. Unset: for the GRPO
    /// reference, TRL's default per-device batch of 8 completions (prompts x generations / 8
    /// micro-batches; one when 8 does not divide it), and one micro-batch for the other
    /// workloads' references; cotlab's token budget (`max_tokens_per_micro_batch`) for cotlab.
    #[arg(long, requires = "model")]
    grad_accum: Option<usize>,
    /// With --model --workload grpo: run every row as prompt + completion in cotlab's training
    /// forwards instead of each prompt once (`share_prompt_prefix = false`), to compare.
    #[arg(long, requires = "model")]
    no_prompt_sharing: bool,
    /// With --model: sampling temperature (TRL's default 1.0).
    #[arg(long, default_value_t = 1.0, requires = "model")]
    temperature: f32,
    /// With --model: AdamW's learning rate (TRL's GRPO default 1e-6).
    #[arg(long, default_value_t = 1e-6, requires = "model")]
    learning_rate: f64,
    /// With --model: compute dtype of both sides.
    #[arg(long, value_enum, default_value_t, requires = "model")]
    dtype: crate::common::ComputeDtype,
    /// With --model: CPU threads of each side (default: rayon's pool, `RAYON_NUM_THREADS` or the cores).
    #[arg(long, requires = "model")]
    threads: Option<usize>,
    /// With --model: the GSM8K file the questions come from (default: the shared test split,
    /// `$COTLAB_SHARED/datasets/gsm8k/test.jsonl`).
    #[arg(long, requires = "model")]
    data: Option<std::path::PathBuf>,
    /// With --model: do not append the run to `reports/bench/models.jsonl`.
    #[arg(long, requires = "model")]
    no_record: bool,
}

/// The shapes measured; printed so anyone can rerun them elsewhere.
#[derive(Debug, Clone, Serialize)]
struct BenchShape {
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    vocab_size: usize,
    batch_size: usize,
    seq_len: usize,
    gen_batch_size: usize,
    prompt_len: usize,
    new_tokens: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    train_tokens_per_s: f64,
    gen_tokens_per_s: f64,
    torch_train_tokens_per_s: Option<f64>,
    torch_gen_tokens_per_s: Option<f64>,
    backend: String,
    preset: String,
    config: BenchShape,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if cfg!(debug_assertions) && !args.allow_debug {
        eprintln!("bench: re-running in release (the first release build takes a while)");
        let forwarded: Vec<String> = std::env::args().skip(1).collect();
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
            .args(&forwarded)
            .status()
            .context("running cargo")?;
        anyhow::ensure!(status.success(), "the release bench failed");
        return Ok(());
    }
    if args.model.is_some() {
        return run_model(&args);
    }
    let preset = match args.preset.as_str() {
        "tiny-gpt-neo" => Preset::TinyGptNeo,
        "small-gpt-neo" => Preset::SmallGptNeo,
        other => anyhow::bail!("--preset {other}: use tiny-gpt-neo or small-gpt-neo"),
    };
    let shape = BenchShape {
        hidden_size: if preset == Preset::TinyGptNeo { 128 } else { 256 },
        num_layers: 4,
        num_heads: 4,
        vocab_size: 512,
        batch_size: 16,
        seq_len: 128,
        gen_batch_size: 32,
        prompt_len: 32,
        new_tokens: 64,
    };
    let device = args.backend.device()?;
    let config = preset.config(shape.vocab_size, 0, 256);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut random_ids =
        |count: usize| -> Vec<i64> { (0..count).map(|_| rng.random_range(2..shape.vocab_size as i64)).collect() };

    // Training: forward + backward + clipping + AdamW on B x T tokens, all trained on.
    let examples: Vec<SftExample> = (0..shape.batch_size)
        .map(|_| {
            let ids = random_ids(shape.seq_len);
            SftExample { prompt_ids: ids[..1].to_vec(), completion_ids: ids[1..].to_vec() }
        })
        .collect();
    let steps = args.train_steps as u64 + 1;
    let sft = SftConfig {
        steps,
        batch_size: shape.batch_size,
        schedule: Schedule { learning_rate: 1e-4, warmup_steps: 0, total_steps: steps, min_lr_ratio: 1.0 },
        adamw: AdamWSettings::default(),
        max_grad_norm: Some(1.0),
        checkpoint_every: 0,
        seed: 0,
        pad_token_id: 1,
        // One pass over the whole batch, as the PyTorch reference runs it.
        max_tokens_per_micro_batch: usize::MAX,
        dtype: Default::default(),
    };
    let model = CausalLm::init(&config, &device.clone().autodiff()).map_err(anyhow::Error::msg)?;
    let mut trainer = SftTrainer::new(model, sft);
    trainer.train_step(&examples)?; // warm-up
    let started = Instant::now();
    for _ in 0..args.train_steps {
        trainer.train_step(&examples)?;
    }
    let train_seconds = started.elapsed().as_secs_f64() / args.train_steps as f64;
    let train_tokens_per_s = (shape.batch_size * shape.seq_len) as f64 / train_seconds;

    // Generation: top-p sampling with the KV cache, every row generating all new tokens.
    let model = CausalLm::init(&config, &device).map_err(anyhow::Error::msg)?;
    let prompts: Vec<Vec<i64>> = (0..shape.gen_batch_size).map(|_| random_ids(shape.prompt_len)).collect();
    let generation_config = GenerationConfig {
        max_new_tokens: shape.new_tokens,
        sampler: Sampler::Sample { temperature: 1.0, top_k: None, top_p: Some(0.9) },
        eos_token_ids: vec![],
        pad_token_id: 1,
        seed: 0,
    };
    generate(&model, &prompts[..2], &GenerationConfig { max_new_tokens: 4, ..generation_config.clone() }, &[], None);
    let started = Instant::now();
    let generation = generate(&model, &prompts, &generation_config, &[], None);
    let gen_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(generation.completion_ids[0].len() == shape.new_tokens, "generation stopped early");
    let gen_tokens_per_s = (shape.gen_batch_size * shape.new_tokens) as f64 / gen_seconds;

    let torch = if args.no_torch { None } else { torch_reference(&shape) };
    let report = Report {
        train_tokens_per_s,
        gen_tokens_per_s,
        torch_train_tokens_per_s: torch.as_ref().and_then(|t| t["train_tokens_per_s"].as_f64()),
        torch_gen_tokens_per_s: torch.as_ref().and_then(|t| t["gen_tokens_per_s"].as_f64()),
        backend: args.backend.to_string(),
        preset: args.preset.clone(),
        config: shape,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let ratio = |ours: f64, theirs: Option<f64>| theirs.map_or("n/a".to_string(), |t| format!("{:.2}x", ours / t));
        let torch_text = |value: Option<f64>| value.map_or("not installed".to_string(), |v| format!("{v:>9.0}"));
        println!(
            "cotlab bench: {} on {} (d={}, {} layers, vocab {})",
            report.preset,
            report.backend,
            report.config.hidden_size,
            report.config.num_layers,
            report.config.vocab_size
        );
        println!("{:<34} {:>10} {:>14} {:>8}", "", "cotlab", "PyTorch", "ratio");
        println!(
            "{:<34} {:>10.0} {:>14} {:>8}",
            format!("train tokens/s (B={}, T={})", report.config.batch_size, report.config.seq_len),
            train_tokens_per_s,
            torch_text(report.torch_train_tokens_per_s),
            ratio(train_tokens_per_s, report.torch_train_tokens_per_s)
        );
        println!(
            "{:<34} {:>10.0} {:>14} {:>8}",
            format!("generate tokens/s (B={}, +{})", report.config.gen_batch_size, report.config.new_tokens),
            gen_tokens_per_s,
            torch_text(report.torch_gen_tokens_per_s),
            ratio(gen_tokens_per_s, report.torch_gen_tokens_per_s)
        );
    }
    Ok(())
}

/// The `--model` benchmark's AdamW weight decay, as the benchmark issue set it (cotlab's and
/// transformers' default is 0); both sides leave biases and norm weights out of it.
const BENCH_WEIGHT_DECAY: f64 = 0.01;

/// `--model`: cotlab's side in this process, then the reference as a child process (never both
/// at once), side by side; the run is appended to `reports/bench/models.jsonl`.
fn run_model(args: &Args) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("setting --threads (rayon's pool was already started)")?;
    }
    let config = model::BenchConfig {
        model: args.model.clone().expect("run_model is called with --model"),
        workload: args.workload,
        prompts_per_step: args.prompts,
        num_generations: args.generations,
        max_completion_length: args.new_tokens,
        temperature: args.temperature,
        learning_rate: args.learning_rate,
        weight_decay: BENCH_WEIGHT_DECAY,
        loss_type: "dapo".to_string(),
        beta: 0.0,
        steps: args.steps,
        grad_accum: args.grad_accum,
        share_prompt_prefix: !args.no_prompt_sharing,
        threads: rayon::current_num_threads(),
        dtype: match args.dtype {
            crate::common::ComputeDtype::F32 => "f32",
            crate::common::ComputeDtype::Bf16 => "bf16",
        }
        .to_string(),
        lora: args.lora_rank,
        data: args.data.clone().unwrap_or_else(model::default_data),
        backend: args.backend.to_string(),
    };
    config.validate()?;
    eprintln!(
        "bench: cotlab {} on {} ({} x {} x {} tokens, {} steps, {} threads)",
        config.workload.name(),
        config.model,
        config.prompts_per_step,
        config.num_generations,
        config.max_completion_length,
        config.steps,
        config.threads
    );
    let cotlab = model::measure(&config)?;
    let (reference, reference_error) = if args.no_torch {
        (None, Some("skipped (--no-torch)".to_string()))
    } else {
        eprintln!("bench: reference (tools/bench/trl_grpo.py), after cotlab's side");
        match model::reference(&config) {
            Ok(value) => (Some(value), None),
            Err(why) => {
                eprintln!("bench: no reference: {why}");
                (None, Some(why))
            }
        }
    };
    let report = model::Report {
        date: model::utc_now(),
        commit: model::commit(),
        machine: model::Machine {
            cpu: crate::study::provenance::cpu_model(),
            threads: config.threads,
            features: crate::study::provenance::cpu_features(),
        },
        command: format!("cargo xtask bench {}", std::env::args().skip(2).collect::<Vec<_>>().join(" ")),
        speedup: model::Report::speedup(&cotlab, reference.as_ref()),
        cotlab,
        reference,
        reference_error,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    if !args.no_record && !cfg!(debug_assertions) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../reports/bench/models.jsonl");
        model::record(&report, &path)?;
        eprintln!("bench: recorded in {}", path.display());
    }
    Ok(())
}

/// Runs `tools/bench/torch_ref.py` on the same shapes; `None` when Python or torch is missing.
fn torch_reference(shape: &BenchShape) -> Option<serde_json::Value> {
    let python = std::env::var("COTLAB_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench/torch_ref.py");
    let output = Command::new(python)
        .arg(script)
        .args(["--hidden-size", &shape.hidden_size.to_string(), "--num-layers", &shape.num_layers.to_string()])
        .args(["--num-heads", &shape.num_heads.to_string(), "--vocab-size", &shape.vocab_size.to_string()])
        .args(["--batch-size", &shape.batch_size.to_string(), "--seq-len", &shape.seq_len.to_string()])
        .args(["--gen-batch-size", &shape.gen_batch_size.to_string(), "--prompt-len", &shape.prompt_len.to_string()])
        .args(["--new-tokens", &shape.new_tokens.to_string()])
        .output()
        .ok()?;
    if !output.status.success() {
        eprintln!(
            "bench: PyTorch reference unavailable: {}",
            String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("")
        );
        return None;
    }
    serde_json::from_slice(String::from_utf8_lossy(&output.stdout).lines().last()?.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn model_flags_have_the_issues_defaults_and_need_model() {
        let cli = Cli::try_parse_from(["bench", "--model", "m.gguf"]).unwrap();
        let args = cli.args;
        assert_eq!(
            (args.workload, args.prompts, args.generations, args.new_tokens, args.steps, args.grad_accum),
            (model::Workload::Grpo, 8, 8, 64, 3, None)
        );
        assert_eq!((args.temperature, args.learning_rate, args.lora_rank, args.threads), (1.0, 1e-6, None, None));
        let cli = Cli::try_parse_from([
            "bench",
            "--model",
            "m",
            "--workload",
            "generate",
            "--prompts",
            "4",
            "--generations",
            "4",
            "--new-tokens",
            "32",
            "--steps",
            "2",
            "--lora-rank",
            "8",
            "--grad-accum",
            "2",
            "--threads",
            "1",
        ])
        .unwrap();
        assert_eq!(
            (cli.args.workload, cli.args.prompts, cli.args.generations, cli.args.new_tokens, cli.args.steps),
            (model::Workload::Generate, 4, 4, 32, 2)
        );
        assert_eq!((cli.args.lora_rank, cli.args.grad_accum, cli.args.threads), (Some(8), Some(2), Some(1)));
        // The toy bench stays the default; the model flags are refused without --model.
        assert!(Cli::try_parse_from(["bench"]).unwrap().args.model.is_none());
        assert!(Cli::try_parse_from(["bench", "--workload", "train"]).is_err());
        assert!(Cli::try_parse_from(["bench", "--steps", "2"]).is_err());
    }
}
