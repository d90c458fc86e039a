//! `cargo xtask generate --model <dir-gguf-or-hub-id> (--prompt TEXT [--chat] | --ids 1,2,3)
//! --max-new-tokens N [--greedy | --temperature T --top-p P] [--seed S] [--json]`.

use anyhow::Context;
use policy_models::generate::{GenerationConfig, Sampler, generate};
use policy_models::{BackendKind, PolicyTokenizer};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "ids"])))]
pub struct Args {
    /// A checkpoint directory in the Hugging Face layout, a GGUF file, or a hub id
    /// `owner/name[@revision]`.
    #[arg(long)]
    model: String,
    /// Prompt text (needs the checkpoint's tokenizer).
    #[arg(long)]
    prompt: Option<String>,
    /// Send --prompt as a user message through the checkpoint's chat template (with the
    /// assistant header after it), as an instruct model expects.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<i64>>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Always take the most likely token (the default unless --temperature, --top-p or --top-k is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability.
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only this many most likely tokens (and any tied with the last; 0: all).
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON `{"completion_ids": [...], "text": ...}`.
    #[arg(long)]
    json: bool,
    /// The burn backend.
    #[arg(long, default_value = "flex")]
    backend: BackendKind,
    /// Compute in this dtype (bf16: weights and activations in bfloat16, logits in f32).
    #[arg(long, value_enum, default_value_t)]
    dtype: crate::common::ComputeDtype,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (dir, model) = crate::common::load_policy(&args.model, args.backend, args.dtype)?;
    // Only a checkpoint without any tokenizer runs without one (--ids, no EOS, ids printed): a
    // tokenizer that is present but unreadable would silently drop its EOS ids and the decoding.
    let tokenizer = match PolicyTokenizer::load_dir(&dir) {
        Ok(tokenizer) => Some(tokenizer),
        Err(policy_models::tokenizer::TokenizerError::NotFound { .. }) => None,
        Err(error) => {
            return Err(anyhow::anyhow!(error)
                .context(format!("the tokenizer of {} is unreadable; fix or remove it", dir.display())));
        }
    };
    let prompt: Vec<i64> = match (&args.prompt, &args.ids) {
        (Some(text), _) => {
            let tokenizer = tokenizer
                .as_ref()
                .with_context(|| format!("--prompt needs a tokenizer in {}; pass --ids instead", dir.display()))?;
            let ids = if args.chat {
                let template = prompting::ChatTemplate::from_dir(&dir)?;
                let options = prompting::RenderOptions { add_generation_prompt: true, ..Default::default() };
                let rendered =
                    template.render(&[prompting::Message::new(prompting::Role::User, text.as_str())], &options)?;
                // The template wrote every special token it wants (transformers' and TRL's
                // `add_special_tokens=False` after `apply_chat_template`).
                tokenizer.encode(&rendered, false)?
            } else {
                // As transformers' `tokenizer(text)`: the tokenizer decides whether a BOS goes first.
                tokenizer.encode(text, true)?
            };
            ids.into_iter().map(i64::from).collect()
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => unreachable!("clap requires --prompt or --ids"),
    };
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    let sampler = if args.greedy || (args.temperature.is_none() && args.top_p.is_none() && args.top_k.is_none()) {
        Sampler::Greedy
    } else {
        Sampler::Sample { temperature: args.temperature.unwrap_or(1.0), top_k: args.top_k, top_p: args.top_p }
    };
    let eos_ids: Vec<i64> =
        tokenizer.as_ref().map(|t| t.eos_ids.iter().map(|&id| i64::from(id)).collect()).unwrap_or_default();
    let pad = tokenizer.as_ref().and_then(|t| t.pad_id).map_or(0, i64::from);
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampler,
        eos_token_ids: eos_ids,
        pad_token_id: pad,
        seed: args.seed,
    };
    let generation = generate(&model, &[prompt], &config, &[], None);
    let completion: Vec<i64> = generation.completion_ids[0]
        .iter()
        .zip(&generation.completion_mask[0])
        .filter(|(_, keep)| **keep)
        .map(|(id, _)| *id)
        .collect();
    let text = match &tokenizer {
        Some(tokenizer) => Some(tokenizer.decode(&completion.iter().map(|&id| id as u32).collect::<Vec<_>>(), true)?),
        None => None,
    };
    if args.json {
        println!("{}", serde_json::json!({ "completion_ids": completion, "text": text }));
    } else {
        match text {
            Some(text) => println!("{text}"),
            None => println!("{}", completion.iter().map(i64::to_string).collect::<Vec<_>>().join(",")),
        }
    }
    Ok(())
}
