//! GRPO and PPO for language models, rule-based rewards, and the trait through which the study
//! runner drives any RL algorithm.
//!
//! In this build: the rule-based rewards ([`rewards`]). GRPO, PPO and the plug-in trait are
//! still to come (rl-algos issue).
//!
//! Architecture invariant: reward functions do no I/O.

pub mod advantages;
pub mod grpo;
pub mod rewards;

pub use policy_models::BackendKind;
