//! A causal LM as its own verifier: the score of a completion y of a prompt x is β times the mean
//! log-probability of y's tokens under the model,
//!
//!   score(x, y) = β · (1/|y|) Σ_t log π(y_t | x, y_<t)
//!
//! (SimPO's length-normalised implicit reward, here without a reference model), trained through
//! the LM head with the same pairwise loss as a score head: Bradley-Terry,
//! -log σ(score(x, y+) - score(x, y-)) = -log σ(β (mean log π(y+) - mean log π(y-))).
//!
//! Why a second kind beside the score head ([`crate::CausalRewardModel`]): on SmolLM2 and the
//! synthetic task, a score head on the last token trained on the same comparisons told corrupted
//! steps at 58% and the policy's own right from wrong answers at 34%, while the model's own
//! likelihood, untrained, already ordered them at 69% and 75%, and trained this way 87-90% and
//! 73-83% (`research/smollm2_likelihood_verifier_probe.py`, docs/results.md). The pretrained
//! model's next-token prediction is the checker; a fresh head has to learn one from a few
//! hundred pairs.
//!
//! What it keeps: the policy's own prior. Fluent, repetitive or short text can score high, so as
//! an RL reward it wants the rules' format check beside it and a KL penalty.
//!
//! Rows are [`crate::train::RowLayout::Continuation`]: the prompt as the policy read it, then the
//! completion. A completion with no tokens scores β · log(1/V), the uniform distribution's
//! log-probability: no answer is worth no more than chance (a mean over nothing would be 0, the
//! highest score there is).
//!
//! Saved as the causal LM itself (`LlamaForCausalLM` and its siblings; LoRA merged, adapters in
//! `adapter/`), with `"cotlab_reward": {"score": "likelihood", "beta": β}` in `config.json`,
//! which transformers keeps as a config attribute and [`LikelihoodRewardModel::saved_beta`] reads.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use policy_models::CausalLm;
use policy_models::weights::LoadError;

use crate::causal::padded_hidden_states;

/// The `config.json` key that marks a saved likelihood verifier.
pub const CONFIG_KEY: &str = "cotlab_reward";

/// A causal LM scored by the mean log-probability of the completion's tokens.
#[derive(Module, Debug)]
pub struct LikelihoodRewardModel {
    lm: CausalLm,
    /// The scale of the score: the Bradley-Terry temperature.
    #[module(skip)]
    beta: f32,
}

impl LikelihoodRewardModel {
    /// `lm` scored with scale `beta` (> 0).
    pub fn new(lm: CausalLm, beta: f32) -> Self {
        assert!(beta.is_finite() && beta > 0.0, "beta must be positive, got {beta}");
        Self { lm, beta }
    }

    /// Loads a causal-LM checkpoint directory; `beta` when given, else the one saved in its
    /// `config.json` ([`LikelihoodRewardModel::saved_beta`]); with neither it is an error.
    pub fn load_dir(dir: &Path, beta: Option<f32>, device: &burn::tensor::Device) -> Result<Self, LoadError> {
        let beta = match beta {
            Some(beta) => beta,
            None => Self::saved_beta(dir)?.ok_or_else(|| LoadError::BadConfig {
                path: dir.join("config.json"),
                message: format!("no {CONFIG_KEY}.beta: not a saved likelihood verifier; give beta"),
            })?,
        };
        if !(beta.is_finite() && beta > 0.0) {
            return Err(LoadError::BadConfig {
                path: dir.join("config.json"),
                message: format!("{CONFIG_KEY}.beta = {beta}; it must be positive"),
            });
        }
        Ok(Self::new(CausalLm::load_dir(dir, device)?, beta))
    }

    /// The β of a likelihood verifier saved by [`LikelihoodRewardModel::save_dir`]; `None` for
    /// any other checkpoint.
    pub fn saved_beta(dir: &Path) -> Result<Option<f32>, LoadError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io { path: path.clone(), source })?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|error| LoadError::BadConfig { path: path.clone(), message: error.to_string() })?;
        let marker = &config[CONFIG_KEY];
        if marker["score"] != "likelihood" {
            return Ok(None);
        }
        marker["beta"].as_f64().map(|beta| Some(beta as f32)).ok_or_else(|| LoadError::BadConfig {
            path,
            message: format!("{CONFIG_KEY}.beta is missing or not a number"),
        })
    }

    /// Saves the causal LM ([`CausalLm::save_dir`]) and marks its `config.json`.
    pub fn save_dir(&self, dir: &Path) -> Result<(), LoadError> {
        self.lm.save_dir(dir, None)?;
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io { path: path.clone(), source })?;
        let mut config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|error| LoadError::BadConfig { path: path.clone(), message: error.to_string() })?;
        config[CONFIG_KEY] = serde_json::json!({ "score": "likelihood", "beta": self.beta });
        let temporary = dir.join("config.json.tmp");
        std::fs::write(&temporary, serde_json::to_string_pretty(&config).expect("json"))
            .map_err(|source| LoadError::Io { path: temporary.clone(), source })?;
        std::fs::rename(&temporary, &path).map_err(|source| LoadError::Io { path, source })
    }

    /// Attaches LoRA adapters to the LM ([`CausalLm::with_lora`]).
    pub fn with_lora(self, settings: &policy_models::LoraSettings) -> Result<Self, String> {
        Ok(Self { lm: self.lm.with_lora(settings)?, ..self })
    }

    /// This model (the run's start, with the same adapters attached when it trained with LoRA)
    /// with the weights of a checkpoint saved by [`LikelihoodRewardModel::save_dir`]: with
    /// adapters, the checkpoint's adapters on the frozen base; without, the whole checkpoint.
    pub fn with_checkpoint(self, dir: &Path) -> Result<Self, LoadError> {
        if self.lm.has_adapters() {
            let lm = self.lm.load_adapters(&dir.join(policy_models::lora::ADAPTER_SUBDIR))?;
            return Ok(Self { lm, ..self });
        }
        let device = self.lm.devices()[0].clone();
        Ok(Self { lm: CausalLm::load_dir(dir, &device)?, ..self })
    }

    /// The language model.
    pub fn lm(&self) -> &CausalLm {
        &self.lm
    }

    /// The score's scale.
    pub fn beta(&self) -> f32 {
        self.beta
    }

    /// Final hidden states of right-padded rows.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: [B][T] → [B, T, C]
    pub fn encode(&self, input_ids: &[Vec<i64>], attention_mask: &[Vec<bool>]) -> Tensor<3> {
        padded_hidden_states(&self.lm, input_ids, attention_mask)
    }

    /// β times the mean log-probability of each row's tokens from `completion_start[b]` to its
    /// `length[b]` (rows right-padded). Only the positions that predict completion tokens go
    /// through the fused LM head ([`CausalLm::token_log_probs`]): no [B, T, V] logits.
    ///
    /// # Shapes
    /// - `hidden`: [B, T, C], `input_ids`: [B][T], `completion_start`, `lengths`: [B] → [B]
    pub fn score_hidden(
        &self,
        hidden: Tensor<3>,
        input_ids: &[Vec<i64>],
        completion_start: &[usize],
        lengths: &[usize],
    ) -> Tensor<1> {
        let [batch, length, width] = hidden.dims();
        let device = hidden.device();
        // The hidden state at position t predicts token t + 1.
        let (mut positions, mut targets, mut owners) = (Vec::new(), Vec::new(), Vec::new());
        for b in 0..batch {
            let start = completion_start[b].max(1);
            for (t, &id) in input_ids[b].iter().enumerate().take(lengths[b]).skip(start) {
                positions.push((b * length + t - 1) as i64);
                targets.push(id);
                owners.push(b);
            }
        }
        let counts: Vec<usize> = (0..batch).map(|b| owners.iter().filter(|&&owner| owner == b).count()).collect();
        let uniform = -(self.lm.config().vocab_size() as f32).ln();
        let empty: Vec<f32> = counts.iter().map(|&count| if count == 0 { uniform } else { 0.0 }).collect();
        let empty = Tensor::<1>::from_data(TensorData::new(empty, [batch]), &device);
        let tokens = positions.len();
        if tokens == 0 {
            return empty * self.beta;
        }
        let index = Tensor::<1, Int>::from_data(TensorData::new(positions, [tokens]), &device);
        let predicting = hidden.reshape([batch * length, width]).select(0, index); // [N, C]
        let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [tokens]), &device);
        let (log_probs, _) = self.lm.token_log_probs(predicting, targets, 1.0); // [N]
        // Row means as one product: averaging[b, n] = 1 / count_b where token n is row b's.
        let mut averaging = vec![0.0f32; batch * tokens];
        for (n, &b) in owners.iter().enumerate() {
            averaging[b * tokens + n] = 1.0 / counts[b] as f32;
        }
        let averaging = Tensor::<2>::from_data(TensorData::new(averaging, [batch, tokens]), &device);
        let means = averaging.matmul(log_probs.reshape([tokens, 1])).reshape([batch]); // [B]
        (means + empty) * self.beta
    }
}
