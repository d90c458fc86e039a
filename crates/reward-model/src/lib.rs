//! A RoBERTa (DistilRoBERTa) sequence-regression reward model in burn, trained on comparisons
//! and used as a reward for PPO and GRPO.
//!
//! Skeleton in this build: the encoder, loading, comparison data and training come with the
//! reward-model issue. It shares the backend selection of `policy-models`.

pub use policy_models::BackendKind;
