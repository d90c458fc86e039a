//! Qwen2 (the Qwen2.5 family), as transformers' `Qwen2ForCausalLM`: the shared rotary decoder
//! (`decoder.rs`, which holds the key table) with biases on q, k and v only, RoPE in the
//! rotate-half layout, grouped-query attention, RMSNorm, a SwiGLU MLP, and a tied or untied head.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::decoder::{DecoderSpec, rope_from_config};

/// Qwen2's `config.json`, field names as transformers writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    /// `V`.
    pub vocab_size: usize,
    /// `C`.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Longest context.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (older config style).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (older config style).
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// RoPE settings (transformers 5 style, `rope_theta` inside).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// LM head shares the token embedding (Qwen2.5 0.5B: true; 1.5B: true; 7B: false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Sliding-window attention (not implemented; no Qwen2.5 checkpoint enables it).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    /// Standard deviation of freshly initialised weights.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_initializer_range() -> f64 {
    0.02
}

impl Qwen2Config {
    /// The shared decoder's spec.
    pub fn spec(&self) -> Result<DecoderSpec, String> {
        if self.use_sliding_window {
            return Err("use_sliding_window = true is not supported".to_string());
        }
        let head_dim = self.hidden_size / self.num_attention_heads;
        let spec = DecoderSpec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            rope: rope_from_config(
                head_dim,
                self.rope_theta,
                self.rope_scaling.as_ref(),
                self.rope_parameters.as_ref(),
            )?,
            initializer_range: self.initializer_range,
        };
        spec.validate()?;
        Ok(spec)
    }
}
