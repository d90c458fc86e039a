//! GRPO and PPO for language models, rule-based rewards, and the trait through which the study
//! runner drives any RL algorithm.
//!
//! - [`algorithm`]: the plug-in trait [`RlAlgorithm`], the registry entry type, shared settings.
//! - [`grpo`]: GRPO (one file, rollout to update); [`advantages`]: group normalisation, GAE.
//! - [`rewards`]: rule-based rewards; [`rollout`]: sampling and scoring layout shared by methods.
//!
//! - [`ppo`]: PPO with a value head, GAE and the clipped policy and value losses.
//!
//! Every algorithm checkpoints and resumes through [`RlAlgorithm`], and splits its updates into
//! micro-batches with gradient accumulation (`max_tokens_per_micro_batch`).
//!
//! Architecture invariant: reward functions do no I/O.

pub mod advantages;
pub mod algorithm;
pub mod grpo;
pub mod ppo;
pub mod rewards;
pub mod rollout;

pub use algorithm::{
    AlgorithmEntry, AlgorithmInputs, Environment, Metrics, OptimSettings, PromptItem, RlAlgorithm, RlError,
    RolloutShape,
};

/// The algorithms this crate provides; the study runner adds those of other crates.
pub const BUILTIN: &[AlgorithmEntry] = &[grpo::ENTRY, ppo::ENTRY];

pub use policy_models::BackendKind;
