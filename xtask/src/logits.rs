//! `cargo xtask logits --model <dir-or-hub-id> --ids 1,2,3 [--out file.json]`: the logits at
//! every position, as JSON `{"logits": [[...], ...]}` ([T, V]); for a RoBERTa reward model, its
//! score as `{"logits": [[score]]}`. A tool for porting checkpoints.

use std::path::PathBuf;

use policy_models::{BackendKind, ModelSource, StepInput};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A checkpoint directory in the Hugging Face layout, or a hub id `owner/name[@revision]`.
    #[arg(long)]
    model: String,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<i64>,
    /// Write the JSON here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The burn backend.
    #[arg(long, default_value = "flex")]
    backend: BackendKind,
    /// Compute in this dtype (bf16: weights and activations in bfloat16, logits in f32).
    #[arg(long, value_enum, default_value_t)]
    dtype: crate::common::ComputeDtype,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = ModelSource::parse(&args.model)?.resolve()?;
    let json = if is_reward_model(&dir) { reward_model_score(&dir, &args)? } else { policy_logits(&args)? };
    match args.out {
        Some(path) => crate::common::write_atomically(&path, json.as_bytes())?,
        None => println!("{json}"),
    }
    Ok(())
}

/// A RoBERTa checkpoint is scored by the reward model (`{"logits": [[score]]}`).
fn is_reward_model(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|config| config["model_type"] == "roberta")
}

fn reward_model_score(dir: &std::path::Path, args: &Args) -> anyhow::Result<String> {
    let (model, head) = reward_model::RobertaRegressor::load_dir(dir, &args.backend.device()?)?;
    if head == reward_model::HeadSource::Initialised {
        eprintln!("logits: {} has no regression head; the score comes from a freshly initialised one", dir.display());
    }
    let score = model.score(std::slice::from_ref(&args.ids), &[vec![true; args.ids.len()]]).into_scalar::<f32>();
    Ok(serde_json::to_string(&serde_json::json!({ "logits": [[score]] }))?)
}

fn policy_logits(args: &Args) -> anyhow::Result<String> {
    let (_, model) = crate::common::load_policy(&args.model, args.backend, args.dtype)?;
    let vocab = model.config().vocab_size();
    if let Some(bad) = args.ids.iter().find(|id| **id < 0 || **id as usize >= vocab) {
        anyhow::bail!("--ids: {bad} is outside the vocabulary (0..{vocab})");
    }
    let input = StepInput::from_padded(std::slice::from_ref(&args.ids), &[vec![true; args.ids.len()]]);
    let logits = model.forward(&input, &mut model.new_cache()); // [1, T, V]
    let values = logits.into_data().try_to_vec::<f32>().map_err(|error| anyhow::anyhow!("{error:?}"))?;
    let rows: Vec<&[f32]> = values.chunks(vocab).collect();
    Ok(serde_json::to_string(&serde_json::json!({ "logits": rows }))?)
}
