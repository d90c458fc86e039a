//! Prompts as token ids: the cell's prompt builder, encoding with the tokenizer's own special
//! tokens, and cutting a prompt to fit.

use std::path::Path;

use policy_models::PolicyTokenizer;
use prompting::{PromptBuilder, sample_exemplars};
use tasks::TaskData;

use crate::study::config::Study;

/// The prompt builder of a cell: the template, k exemplars from train, the chat template when asked.
pub(crate) fn prompt_builder(
    study: &Study,
    task: &TaskData,
    base_dir: &Path,
    k: usize,
    seed: u64,
) -> anyhow::Result<PromptBuilder> {
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
pub(crate) fn fit(mut ids: Vec<i64>, limit: usize, bos: Option<i64>) -> Vec<i64> {
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
pub(crate) fn encode(tokenizer: &PolicyTokenizer, text: &str, add_special_tokens: bool) -> anyhow::Result<Vec<i64>> {
    Ok(tokenizer.encode(text, add_special_tokens)?.into_iter().map(i64::from).collect())
}

/// Token ids of a prompt `builder` rendered. Text a chat template rendered already holds what the
/// template puts in and is encoded without special tokens, as TRL does; a plain-text prompt gets
/// what the tokenizer adds (TRL adds nothing there either: a Llama 3 base model then reads its
/// prompts without `<|begin_of_text|>`, which cotlab keeps, as transformers' `generate` users do).
pub(crate) fn encode_prompt(
    tokenizer: &PolicyTokenizer,
    builder: &PromptBuilder,
    text: &str,
) -> anyhow::Result<Vec<i64>> {
    encode(tokenizer, text, !builder.uses_chat_template())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
}
