//! Reward models trained on comparisons, used as a reward for PPO and GRPO: a RoBERTa
//! (DistilRoBERTa) regressor, or a causal LM with a scalar head on its last non-padding token.
//!
//! - [`roberta`]: the encoder, loaded from Hugging Face checkpoints with its regression head or
//!   without one (then initialised), matching transformers;
//! - [`causal`]: the causal-LM reward model (`LlamaForSequenceClassification` and its Qwen2 and
//!   GPT-Neo siblings), from any policy checkpoint or a model in memory, with LoRA;
//! - [`likelihood`]: a causal LM as its own verifier, scored by the mean log-probability of the
//!   completion (trained through its LM head), with LoRA;
//! - [`comparisons`]: (prompt, chosen, rejected) pairs from task problems or policy samples;
//! - [`train`]: Bradley-Terry (or MSE) training with checkpoints and resume, for either model
//!   through the [`RewardModel`] trait;
//! - [`reward`]: the model behind rl-algos' reward-function trait.

pub mod causal;
pub mod comparisons;
pub mod likelihood;
pub mod reward;
pub mod roberta;
pub mod train;

pub use causal::CausalRewardModel;
pub use likelihood::LikelihoodRewardModel;
pub use policy_models::BackendKind;
pub use roberta::{HeadSource, RobertaConfig, RobertaRegressor};
pub use train::{RewardModel, RewardRows, RowLayout};
