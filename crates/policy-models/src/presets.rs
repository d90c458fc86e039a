//! Tiny from-scratch models for the CPU default: a byte-level BPE tokenizer trained on the task
//! corpus (digits always single tokens, so arithmetic is learnable digit by digit) and small
//! configurations of each architecture.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::gpt_neo::{AttentionKind, GptNeoConfig};
use crate::llama::LlamaConfig;
use crate::model::ModelConfig;
use crate::qwen2::Qwen2Config;
use crate::tokenizer::{PolicyTokenizer, TokenizerError};

/// End of a document; id 0 in trained tokenizers.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Padding; id 1 in trained tokenizers.
pub const PAD_TOKEN: &str = "<|pad|>";

/// The smallest vocabulary [`train_tokenizer`] honours: the byte-level alphabet (256 tokens,
/// always kept so that any text can be encoded) and the two special tokens. Below it the trainer
/// silently returns this many tokens anyway, so a study asking for fewer is refused.
pub const MIN_TRAINED_VOCAB: usize = 256 + 2;

/// Trains a byte-level BPE tokenizer on `texts`, with at most `vocab_size` tokens, `EOS_TOKEN`
/// (id 0) and `PAD_TOKEN` (id 1). Digits are split before merging, so every digit stays its own
/// token and numbers are read digit by digit.
pub fn train_tokenizer<I>(texts: I, vocab_size: usize) -> Result<PolicyTokenizer, TokenizerError>
where
    I: Iterator<Item = String> + Send,
{
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(alphabet)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true), AddedToken::from(PAD_TOKEN, true)])
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|error| TokenizerError::Use(format!("training the tokenizer: {error}")))?;
    let eos = tokenizer.token_to_id(EOS_TOKEN).expect("special token trained");
    let pad = tokenizer.token_to_id(PAD_TOKEN).expect("special token trained");
    Ok(PolicyTokenizer::new(tokenizer, None, vec![eos], Some(pad)))
}

/// A tiny configuration of each architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// GPT-Neo, d = 128, 4 layers of 4 heads, alternating global and local (window 128)
    /// attention: the CPU default, as the GPT-Neo study's model family.
    TinyGptNeo,
    /// GPT-Neo, d = 256, 4 layers of 4 heads: the benchmark's second shape.
    SmallGptNeo,
    /// Qwen2, d = 128, 4 layers, 4 query and 2 key/value heads, tied head.
    TinyQwen2,
    /// Llama, d = 128, 4 layers, 4 query and 2 key/value heads, llama3 rope scaling.
    TinyLlama,
}

impl Preset {
    /// The configuration for a tokenizer of `vocab_size` tokens whose end-of-sequence id is
    /// `eos_id`, for sequences up to `max_positions`.
    pub fn config(self, vocab_size: usize, eos_id: u32, max_positions: usize) -> ModelConfig {
        match self {
            Preset::TinyGptNeo | Preset::SmallGptNeo => {
                let hidden_size = if self == Preset::TinyGptNeo { 128 } else { 256 };
                ModelConfig::GptNeo(GptNeoConfig {
                    vocab_size,
                    max_position_embeddings: max_positions,
                    hidden_size,
                    num_layers: 4,
                    num_heads: 4,
                    intermediate_size: None,
                    attention_types: vec![(vec![AttentionKind::Global, AttentionKind::Local], 2)],
                    window_size: 128,
                    activation_function: "gelu_new".to_string(),
                    layer_norm_epsilon: 1e-5,
                    bos_token_id: Some(eos_id),
                    eos_token_id: Some(eos_id),
                    initializer_range: 0.02,
                })
            }
            Preset::TinyQwen2 => ModelConfig::Qwen2(Qwen2Config {
                vocab_size,
                hidden_size: 128,
                intermediate_size: 384,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: Some(2),
                max_position_embeddings: Some(max_positions),
                rms_norm_eps: 1e-6,
                rope_theta: Some(10_000.0),
                rope_scaling: None,
                rope_parameters: None,
                tie_word_embeddings: true,
                use_sliding_window: false,
                bos_token_id: None,
                eos_token_id: Some(eos_id.into()),
                initializer_range: 0.02,
            }),
            Preset::TinyLlama => ModelConfig::Llama(LlamaConfig {
                vocab_size,
                hidden_size: 128,
                intermediate_size: 384,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: Some(2),
                head_dim: None,
                max_position_embeddings: Some(max_positions),
                rms_norm_eps: 1e-5,
                rope_theta: Some(500_000.0),
                rope_scaling: Some(serde_json::json!({
                    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64
                })),
                rope_parameters: None,
                attention_bias: false,
                mlp_bias: false,
                tie_word_embeddings: true,
                bos_token_id: None,
                eos_token_id: Some(eos_id.into()),
                initializer_range: 0.02,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CausalLm;
    use burn::tensor::Device;
    use tasks::synthetic::{SyntheticConfig, generate};

    fn corpus() -> Vec<String> {
        let data = generate(&SyntheticConfig { train_size: 400, test_size: 10, seed: 0, ..SyntheticConfig::default() })
            .unwrap();
        data.train.problems.iter().map(|p| format!("Q: {}\nA: {}\n#### {}", p.question, p.solution, p.answer)).collect()
    }

    #[test]
    fn trained_tokenizer_keeps_digits_single_and_round_trips() {
        let tokenizer = train_tokenizer(corpus().into_iter(), 300).unwrap();
        assert!(tokenizer.vocab_size() <= 300);
        assert_eq!((tokenizer.eos_ids.clone(), tokenizer.pad_id), (vec![0], Some(1)));
        let text = "Q: What is 12345 * 678?\nA: 12345 * 678 = 8369910\n#### 8369910";
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
        for digit in '0'..='9' {
            let id = tokenizer.token_to_id(&digit.to_string()).expect("every digit is a token");
            assert!(ids.contains(&id) || !text.contains(digit));
        }
        let number = tokenizer.encode("8369910", false).unwrap();
        assert_eq!(number.len(), 7, "one token per digit");
        // Frequent words were merged: the corpus tokenises to fewer tokens than bytes.
        assert!(ids.len() < text.len());
    }

    #[test]
    fn presets_build_run_and_save() {
        let tokenizer = train_tokenizer(corpus().into_iter(), 300).unwrap();
        let device = Device::flex();
        for preset in [Preset::TinyGptNeo, Preset::TinyQwen2, Preset::TinyLlama] {
            let config = preset.config(tokenizer.vocab_size(), tokenizer.eos_ids[0], 256);
            let model = CausalLm::init(&config, &device).unwrap();
            let ids: Vec<i64> =
                tokenizer.encode("Q: What is 2 + 3?", false).unwrap().into_iter().map(i64::from).collect();
            let input = crate::StepInput::from_padded(std::slice::from_ref(&ids), &[vec![true; ids.len()]]);
            let logits = model.forward(&input, &mut model.new_cache());
            assert_eq!(logits.dims(), [1, ids.len(), tokenizer.vocab_size()]);
            let dir = tempfile::tempdir().unwrap();
            model.save_dir(dir.path(), Some(&tokenizer)).unwrap();
            let reloaded = crate::PolicyTokenizer::load_dir(dir.path()).unwrap();
            assert_eq!(
                reloaded.encode("What is 2 + 3?", false).unwrap(),
                tokenizer.encode("What is 2 + 3?", false).unwrap()
            );
            assert_eq!(reloaded.eos_ids, tokenizer.eos_ids, "{preset:?}: eos id from the saved config");
            assert_eq!(reloaded.pad_id, tokenizer.pad_id, "{preset:?}: pad id from tokenizer_config.json");
            CausalLm::load_dir(dir.path(), &device).unwrap();
        }
    }
}
