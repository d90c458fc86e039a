//! Causal language models for cotlab, in burn: GPT-Neo, Qwen2 (Qwen2.5) and Llama (3.2),
//! loaded unchanged from Hugging Face checkpoints and giving transformers' numbers, with
//! KV-cached sampling, and tiny presets that train from scratch on the CPU.
//!
//! - `gpt_neo.rs`, `qwen2.rs`, `llama.rs`: one file per architecture with its HF `config.json`
//!   struct and key table; Qwen2 and Llama share the computation in `decoder.rs`.
//! - `layers.rs`: attention, masks, rotary embeddings, `gelu_new`, the KV cache.
//! - `fused.rs`: fused CPU kernels (burn backend extensions with hand-written backward passes).
//! - `weights.rs`: safetensors reading with missing/unused/shape checks.
//! - `gguf.rs`: GGUF files (llama.cpp): container, dequantization, key map, config, tokenizer.
//! - `model.rs`: [`CausalLm`], one type over the architectures, and [`ModelSource`].
//! - `prefix.rs`: log-probs of completions sharing prompts, each prompt run once.
//! - `lora.rs`: LoRA adapters in PEFT's layout (saving, loading, the base with them disabled).
//!
//! Architecture invariant: policy-models knows nothing about RL.

pub mod backend;
pub mod bf16_gemm;
pub mod decoder;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod gpt_neo;
pub mod layers;
pub mod llama;
pub mod lora;
pub mod model;
pub mod optim;
pub mod prefix;
pub mod presets;
pub mod qwen2;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use backend::{BackendError, BackendKind};
pub use layers::{KvCache, StepInput};
pub use model::{CausalLm, LoraSettings, ModelConfig, ModelSource};
pub use tokenizer::{PolicyTokenizer, TokenizerError};
pub use weights::LoadError;
