//! The reward model: a RoBERTa (DistilRoBERTa) regressor trained on comparisons, used as a
//! reward for PPO and GRPO.
//!
//! - [`roberta`]: the model, loaded from Hugging Face checkpoints with its regression head or
//!   without one (then initialised), matching transformers;
//! - [`comparisons`]: (prompt, chosen, rejected) pairs from task problems or policy samples;
//! - [`train`]: Bradley-Terry (or MSE) training with checkpoints and resume;
//! - [`reward`]: the model behind rl-algos' reward-function trait.

pub mod comparisons;
pub mod reward;
pub mod roberta;
pub mod train;

pub use policy_models::BackendKind;
pub use roberta::{HeadSource, RobertaConfig, RobertaRegressor};
