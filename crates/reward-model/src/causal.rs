//! A causal language model with a scalar head: transformers' `LlamaForSequenceClassification`,
//! `Qwen2ForSequenceClassification` and `GPTNeoForSequenceClassification` with `num_labels = 1`,
//! the reward-model layout of TRL's RewardTrainer, OpenRLHF and verl.
//!
//! score(x) = w · h_last(x), where h is the trunk's final (normed) hidden states and `last` is
//! the rightmost position whose token is not `pad_token_id`: argmax_t (t · [x_t ≠ pad]), exactly
//! as transformers computes it, so it handles left and right padding alike (a row of padding
//! only reads position 0). Position ids are 0..T for every row, as transformers' forward without
//! `position_ids`; with left padding a row's tokens therefore sit at shifted positions, as they
//! do in transformers.
//!
//! HF key                                  → field
//! `model.*` (Llama, Qwen2) / `transformer.*` (GPT-Neo) → `trunk` ([`CausalLm`]'s key tables)
//! `score.weight` [1, C], no bias          → `score` (initialised normal(0, initializer_range) when absent)
//! `lm_head.weight`                        → read into the trunk when present (a causal-LM checkpoint), never used

use std::path::Path;

use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use policy_models::weights::{LoadError, WeightMap, WeightWriter};
use policy_models::{CausalLm, ModelConfig, StepInput};

use crate::roberta::HeadSource;

/// A causal LM trunk with a one-output linear head on the last non-padding token.
#[derive(Module, Debug)]
pub struct CausalRewardModel {
    trunk: CausalLm,
    score: Linear,
    /// The token whose positions are not scored (transformers' `config.pad_token_id`).
    #[module(skip)]
    pad_token_id: u32,
}

impl CausalRewardModel {
    /// Puts a freshly initialised head (normal(0, initializer_range), as transformers'
    /// `_init_weights`) on `trunk`: a study's trained base, say.
    pub fn from_lm(trunk: CausalLm, pad_token_id: u32, device: &Device) -> Self {
        let config = trunk.config();
        let initializer = Initializer::Normal { mean: 0.0, std: config.initializer_range() };
        let score =
            LinearConfig::new(config.hidden_size(), 1).with_bias(false).with_initializer(initializer).init(device);
        Self { trunk, score: policy_models::optim::initialize_now(score), pad_token_id }
    }

    /// Loads a checkpoint directory: a `*ForSequenceClassification` one (its `score.weight` is
    /// read) or a causal-LM one (the head is initialised). The returned [`HeadSource`] says
    /// which. The padding id is `pad_token_id` when given, else `config.json`'s; with neither
    /// it is an error.
    pub fn load_dir(dir: &Path, pad_token_id: Option<u32>, device: &Device) -> Result<(Self, HeadSource), LoadError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| LoadError::Io { path: config_path.clone(), source })?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|error| LoadError::BadConfig { path: config_path.clone(), message: error.to_string() })?;
        let labels = raw
            .get("num_labels")
            .and_then(serde_json::Value::as_u64)
            .or_else(|| raw.get("id2label").and_then(|map| map.as_object()).map(|map| map.len() as u64));
        if labels.is_some_and(|labels| labels != 1) {
            return Err(LoadError::BadConfig {
                path: config_path,
                message: format!(
                    "num_labels = {}: a reward model has one output; use a checkpoint with num_labels = 1 or a causal-LM one",
                    labels.unwrap_or(0)
                ),
            });
        }
        let pad_token_id = pad_token_id.or_else(|| raw.get("pad_token_id").and_then(serde_json::Value::as_u64).map(|id| id as u32)).ok_or_else(|| {
            LoadError::BadConfig {
                path: config_path.clone(),
                message: "no pad_token_id: the scored token is the last one that is not padding; set pad_token_id in config.json or pass the tokenizer's".to_string(),
            }
        })?;
        let (trunk, mut weights) = CausalLm::load_trunk(dir, device)?;
        let width = trunk.config().hidden_size();
        let (model, source) = if weights.contains("score.weight") {
            let score = weights.linear("score", width, 1, false)?;
            (Self { trunk, score, pad_token_id }, HeadSource::Loaded)
        } else {
            (Self::from_lm(trunk, pad_token_id, device), HeadSource::Initialised)
        };
        weights.finish()?;
        Ok((model, source))
    }

    /// Saves in the Hugging Face layout of `LlamaForSequenceClassification` (or the Qwen2 or
    /// GPT-Neo class) with one label: trunk weights (LoRA merged) and `score.weight` in
    /// `model.safetensors`, `config.json` with `num_labels = 1` and `pad_token_id`; with LoRA,
    /// the adapters also go to `adapter/` in PEFT's layout (what an exact resume reads).
    pub fn save_dir(&self, dir: &Path) -> Result<(), LoadError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut writer = WeightWriter::default();
        self.trunk.export_trunk(&mut writer);
        writer.linear("score", &self.score);
        writer.write(&dir.join("model.safetensors"))?;
        if self.trunk.has_adapters() {
            self.trunk.save_adapters(&dir.join(policy_models::lora::ADAPTER_SUBDIR), None)?;
        }
        let mut config = serde_json::to_value(self.trunk.config()).expect("configs serialise");
        let architecture = match self.trunk.config() {
            ModelConfig::GptNeo(_) => "GPTNeoForSequenceClassification",
            ModelConfig::Qwen2(_) => "Qwen2ForSequenceClassification",
            ModelConfig::Llama(_) => "LlamaForSequenceClassification",
        };
        config["architectures"] = serde_json::json!([architecture]);
        config["num_labels"] = 1.into();
        config["id2label"] = serde_json::json!({"0": "LABEL_0"});
        config["label2id"] = serde_json::json!({"LABEL_0": 0});
        config["pad_token_id"] = self.pad_token_id.into();
        let path = dir.join("config.json");
        let temporary = dir.join("config.json.tmp");
        std::fs::write(&temporary, serde_json::to_string_pretty(&config).expect("json")).map_err(io(&temporary))?;
        std::fs::rename(&temporary, &path).map_err(io(&path))
    }

    /// Attaches LoRA adapters to the trunk ([`CausalLm::with_lora`]); the head stays trainable
    /// in full.
    pub fn with_lora(self, settings: &policy_models::LoraSettings) -> Result<Self, String> {
        Ok(Self { trunk: self.trunk.with_lora(settings)?, ..self })
    }

    /// This model (the run's start, with the same adapters attached when it trained with LoRA)
    /// with the weights of a checkpoint saved by [`CausalRewardModel::save_dir`]: with adapters,
    /// the checkpoint's adapters and head, so the base stays frozen and the optimizer state
    /// matches what it belongs to; without, the whole checkpoint.
    pub fn with_checkpoint(self, dir: &Path) -> Result<Self, LoadError> {
        if !self.trunk.has_adapters() {
            let device = self.score.weight.device();
            return Ok(Self::load_dir(dir, Some(self.pad_token_id), &device)?.0);
        }
        let trunk = self.trunk.load_adapters(&dir.join(policy_models::lora::ADAPTER_SUBDIR))?;
        let device = self.score.weight.device();
        let mut weights = WeightMap::open(dir, &device)?;
        let width = trunk.config().hidden_size();
        let score = weights.linear("score", width, 1, false)?;
        // The trunk's merged weights are the start's plus the adapters just loaded.
        Ok(Self { trunk, score, pad_token_id: self.pad_token_id })
    }

    /// The trunk.
    pub fn trunk(&self) -> &CausalLm {
        &self.trunk
    }

    /// The padding id.
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    /// Final hidden states of padded rows (either side): `attention_mask` marks real tokens.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: [B][T] → [B, T, C]
    pub fn encode(&self, input_ids: &[Vec<i64>], attention_mask: &[Vec<bool>]) -> Tensor<3> {
        padded_hidden_states(&self.trunk, input_ids, attention_mask)
    }

    /// The score of each row from its final hidden states, read at [`last_non_pad`].
    ///
    /// # Shapes
    /// - `hidden`: [B, T, C], `input_ids`: [B][T] → [B]
    pub fn score_hidden(&self, hidden: Tensor<3>, input_ids: &[Vec<i64>]) -> Tensor<1> {
        let [batch, length, width] = hidden.dims();
        let rows: Vec<i64> = input_ids
            .iter()
            .enumerate()
            .map(|(b, ids)| (b * length + last_non_pad(ids, i64::from(self.pad_token_id))) as i64)
            .collect();
        let rows: Tensor<1, Int> = Tensor::from_data(TensorData::new(rows, [batch]), &hidden.device());
        let last = hidden.reshape([batch * length, width]).select(0, rows); // [B, C]
        self.score.forward(last).reshape([batch])
    }

    /// Scores of padded rows.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: [B][T] → [B]
    pub fn score(&self, input_ids: &[Vec<i64>], attention_mask: &[Vec<bool>]) -> Tensor<1> {
        self.score_hidden(self.encode(input_ids, attention_mask), input_ids)
    }
}

/// Final hidden states of `trunk` on padded rows (either side), position ids 0..T for every row
/// (transformers' forward without `position_ids`).
///
/// # Shapes
/// - `input_ids`, `attention_mask`: [B][T] → [B, T, C]
pub(crate) fn padded_hidden_states(
    trunk: &CausalLm,
    input_ids: &[Vec<i64>],
    attention_mask: &[Vec<bool>],
) -> Tensor<3> {
    let batch_size = input_ids.len();
    let length = input_ids.first().map_or(0, Vec::len);
    assert!(
        input_ids.iter().zip(attention_mask).all(|(ids, mask)| ids.len() == length && mask.len() == length),
        "rows must be padded to one length"
    );
    let input = StepInput {
        batch_size,
        input_ids: input_ids.concat(),
        position_ids: (0..batch_size).flat_map(|_| 0..length as i64).collect(),
        key_mask: attention_mask.concat(),
    };
    trunk.hidden_states(&input, &mut trunk.new_cache())
}

/// transformers' scored position: argmax_t (t · [ids_t ≠ pad]), the first maximum; 0 for a row
/// of padding only.
pub fn last_non_pad(ids: &[i64], pad: i64) -> usize {
    ids.iter().rposition(|&id| id != pad).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::last_non_pad;

    #[test]
    fn the_scored_position_is_transformers_argmax() {
        // Right padding, left padding, none, padding only, and a pad id inside the text.
        assert_eq!(last_non_pad(&[5, 6, 7, 0, 0], 0), 2);
        assert_eq!(last_non_pad(&[0, 0, 5, 6, 7], 0), 4);
        assert_eq!(last_non_pad(&[5, 6, 7], 0), 2);
        assert_eq!(last_non_pad(&[0, 0, 0], 0), 0);
        assert_eq!(last_non_pad(&[5, 0, 7, 0], 0), 2);
    }
}
