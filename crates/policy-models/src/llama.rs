//! Llama (3.2), as transformers' `LlamaForCausalLM`: the shared rotary decoder (`decoder.rs`,
//! which holds the key table), as Qwen2 but with biases only where `attention_bias` and
//! `mlp_bias` say (none in Llama 3.2), an explicit `head_dim`, and `rope_scaling` of type
//! `llama3`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::decoder::{DecoderSpec, rope_from_config};

/// Llama's `config.json`, field names as transformers writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
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
    /// Key/value heads; defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head dimension; defaults to hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Longest context.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (older config style).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (older config style; Llama 3.2 has `rope_type: llama3`).
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// RoPE settings (transformers 5 style).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Biases on q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases in the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    /// LM head shares the token embedding (Llama 3.2 1B and 3B: true).
    #[serde(default)]
    pub tie_word_embeddings: bool,
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

impl LlamaConfig {
    /// The shared decoder's spec.
    pub fn spec(&self) -> Result<DecoderSpec, String> {
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads);
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
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The published Llama-3.2-1B-Instruct config.json (older rope style).
    const LLAMA_3_2_1B: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
      "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
      "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": false,
      "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
      "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256
    }"#;

    #[test]
    fn the_published_llama_3_2_config_resolves() {
        let config: LlamaConfig = serde_json::from_str(LLAMA_3_2_1B).unwrap();
        let spec = config.spec().unwrap();
        assert_eq!((spec.head_dim, spec.num_heads, spec.num_kv_heads), (64, 32, 8));
        assert!(spec.tie_word_embeddings && !spec.qkv_bias);
        // The lowest frequency is divided by the factor, the highest kept.
        let plain = crate::layers::Rope::new(64, 500000.0);
        assert_eq!(spec.rope.inv_freq[0], plain.inv_freq[0]);
        assert!((spec.rope.inv_freq[31] - plain.inv_freq[31] / 32.0).abs() < 1e-12);
    }
}
