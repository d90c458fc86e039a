//! `cargo xtask bench [--json]`: training and generation throughput of a tiny GPT-Neo on the
//! chosen backend, beside PyTorch + transformers on the same shapes (`tools/bench/torch_ref.py`,
//! run with the `python3` on PATH or `$COTLAB_PYTHON`; null where torch is not installed).
//!
//! Speed is only meaningful in a release build: from a debug build this command re-runs itself
//! with `cargo run --release`.

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
    /// Print JSON with the keys listed in the README.
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
    let mut random_ids = |count: usize| -> Vec<i64> { (0..count).map(|_| rng.random_range(2..shape.vocab_size as i64)).collect() };

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
        println!("cotlab bench: {} on {} (d={}, {} layers, vocab {})", report.preset, report.backend, report.config.hidden_size, report.config.num_layers, report.config.vocab_size);
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
        eprintln!("bench: PyTorch reference unavailable: {}", String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or(""));
        return None;
    }
    serde_json::from_slice(String::from_utf8_lossy(&output.stdout).lines().last()?.as_bytes()).ok()
}
