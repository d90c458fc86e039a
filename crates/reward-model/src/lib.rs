//! The reward model: a RoBERTa (DistilRoBERTa) regressor trained on comparisons, used as a
//! reward for PPO and GRPO.
//!
//! In this build: the model ([`roberta`]), loaded from Hugging Face checkpoints with its
//! regression head or without one (then initialised), matching transformers. Comparison data,
//! training and the reward-function adapter come next (reward-model issue).

pub mod roberta;

pub use policy_models::BackendKind;
pub use roberta::{HeadSource, RobertaConfig, RobertaRegressor};
