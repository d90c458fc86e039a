//! GRPO and PPO for language models, rule-based rewards, and the trait through which the study
//! runner drives any RL algorithm.
//!
//! Skeleton in this build: the algorithms, rewards and the plug-in trait come with the rl-algos
//! issue.
//!
//! Architecture invariant: reward functions do no I/O.

pub use policy_models::BackendKind;
