//! `cargo xtask logits --model <dir-or-hub-id> --ids 1,2,3 [--out file.json]`: the logits at
//! every position, as JSON `{"logits": [[...], ...]}` ([T, V]); a tool for porting checkpoints.

use std::path::PathBuf;

use policy_models::{BackendKind, StepInput};

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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (_, model) = crate::common::load_policy(&args.model, args.backend)?;
    let vocab = model.config().vocab_size();
    if let Some(bad) = args.ids.iter().find(|id| **id < 0 || **id as usize >= vocab) {
        anyhow::bail!("--ids: {bad} is outside the vocabulary (0..{vocab})");
    }
    let input = StepInput::from_padded(std::slice::from_ref(&args.ids), &[vec![true; args.ids.len()]]);
    let logits = model.forward(&input, &mut model.new_cache()); // [1, T, V]
    let values = logits.into_data().try_to_vec::<f32>().map_err(|error| anyhow::anyhow!("{error:?}"))?;
    let rows: Vec<&[f32]> = values.chunks(vocab).collect();
    let json = serde_json::to_string(&serde_json::json!({ "logits": rows }))?;
    match args.out {
        Some(path) => crate::common::write_atomically(&path, json.as_bytes())?,
        None => println!("{json}"),
    }
    Ok(())
}
