//! Causal language models for cotlab, in burn: GPT-Neo, Qwen2 (Qwen2.5) and Llama (3.2), loaded
//! from Hugging Face checkpoints, with KV-cached sampling and tiny from-scratch presets.
//!
//! This crate is a skeleton in this build: it holds the backend selection that every crate doing
//! tensor work shares. The architectures, loading, generation and training come with the
//! policy-models issue.
//!
//! Architecture invariant: policy-models knows nothing about RL.

pub mod backend;

pub use backend::{BackendError, BackendKind};
