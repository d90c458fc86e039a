//! GPT-Neo (EleutherAI), as transformers' `GPTNeoForCausalLM`.
//!
//! Learned absolute positions; layers alternate global and local (sliding-window) causal
//! attention as `attention_types` says; attention scores are *not* scaled by 1/sqrt(D) (the
//! original Mesh-TensorFlow model did not scale, and transformers keeps that); `gelu_new` MLP;
//! pre-LayerNorm blocks; the LM head is the transposed token embedding.
//!
//! Legend: `B` batch, `T` new positions, `S` key positions, `H` heads, `D` head dim, `C` width,
//! `V` vocabulary.
//!
//! HF key                                        → cotlab field
//! `transformer.wte.weight` [V, C]               → `wte` (also the LM head, tied)
//! `transformer.wpe.weight` [P, C]               → `wpe`
//! `transformer.h.{i}.ln_1.{weight,bias}`        → `blocks[i].ln_1`
//! `transformer.h.{i}.attn.attention.{q,k,v}_proj.weight` [C, C] (no bias) → `blocks[i].{query,key,value}`
//! `transformer.h.{i}.attn.attention.out_proj.{weight,bias}` → `blocks[i].out_proj`
//! `transformer.h.{i}.ln_2.{weight,bias}`        → `blocks[i].ln_2`
//! `transformer.h.{i}.mlp.c_fc.{weight,bias}` [I, C] → `blocks[i].c_fc`
//! `transformer.h.{i}.mlp.c_proj.{weight,bias}` [C, I] → `blocks[i].c_proj`
//! `transformer.ln_f.{weight,bias}`              → `ln_f`
//! `lm_head.weight`                              → absent or equal to `wte` (tied)
//! `transformer.h.{i}.attn.attention.{bias,masked_bias}` → ignored (causal-mask buffers of old checkpoints)

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::{KvCache, StepInput, attention, gelu_new};
use crate::weights::{LoadError, WeightMap, WeightWriter};

/// GPT-Neo's `config.json`, field names as transformers writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptNeoConfig {
    /// `V`.
    pub vocab_size: usize,
    /// Longest sequence the position table covers.
    pub max_position_embeddings: usize,
    /// `C`.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// `H`.
    pub num_heads: usize,
    /// MLP width; `null` means 4 C.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Groups of `[[kinds...], repeat]`, expanded to one kind per layer (`global`/`local`).
    pub attention_types: Vec<(Vec<AttentionKind>, usize)>,
    /// Keys visible to a local-attention query: the query and the `window_size - 1` before it.
    pub window_size: usize,
    /// Only `gelu_new` is implemented (every GPT-Neo checkpoint uses it).
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Standard deviation of freshly initialised weights.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_activation() -> String {
    "gelu_new".to_string()
}

fn default_epsilon() -> f64 {
    1e-5
}

fn default_initializer_range() -> f64 {
    0.02
}

/// The attention of one GPT-Neo layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Causal attention over every earlier position.
    Global,
    /// Causal attention over the last `window_size` positions.
    Local,
}

impl GptNeoConfig {
    /// One attention kind per layer.
    pub fn attention_layers(&self) -> Vec<AttentionKind> {
        self.attention_types
            .iter()
            .flat_map(|(kinds, repeat)| std::iter::repeat_n(kinds.clone(), *repeat).flatten())
            .collect()
    }

    /// The MLP width.
    pub fn inner_size(&self) -> usize {
        self.intermediate_size.unwrap_or(4 * self.hidden_size)
    }

    /// Checks the fields against each other.
    pub fn validate(&self) -> Result<(), String> {
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!("hidden_size {} is not a multiple of num_heads {}", self.hidden_size, self.num_heads));
        }
        if self.attention_layers().len() != self.num_layers {
            return Err(format!(
                "attention_types expands to {} layers but num_layers is {}",
                self.attention_layers().len(),
                self.num_layers
            ));
        }
        if self.activation_function != "gelu_new" {
            return Err(format!("activation_function `{}` is not supported; only gelu_new", self.activation_function));
        }
        Ok(())
    }
}

/// One pre-norm transformer block.
#[derive(Module, Debug)]
pub struct GptNeoBlock {
    ln_1: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    #[module(skip)]
    window: Option<usize>,
    #[module(skip)]
    num_heads: usize,
}

/// GPT-Neo with its LM head.
#[derive(Module, Debug)]
pub struct GptNeo {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<GptNeoBlock>,
    ln_f: LayerNorm,
    #[module(skip)]
    config: GptNeoConfig,
}

impl GptNeo {
    /// A freshly initialised model (normal(0, initializer_range) weights, as transformers).
    pub fn init(config: &GptNeoConfig, device: &Device) -> Self {
        let std = config.initializer_range;
        let initializer = burn::nn::Initializer::Normal { mean: 0.0, std };
        let linear = |d_in, d_out, bias| {
            LinearConfig::new(d_in, d_out).with_bias(bias).with_initializer(initializer.clone()).init(device)
        };
        let norm = || LayerNormConfig::new(config.hidden_size).with_epsilon(config.layer_norm_epsilon).init(device);
        let c = config.hidden_size;
        let blocks = config
            .attention_layers()
            .into_iter()
            .map(|kind| GptNeoBlock {
                ln_1: norm(),
                query: linear(c, c, false),
                key: linear(c, c, false),
                value: linear(c, c, false),
                out_proj: linear(c, c, true),
                ln_2: norm(),
                c_fc: linear(c, config.inner_size(), true),
                c_proj: linear(config.inner_size(), c, true),
                window: (kind == AttentionKind::Local).then_some(config.window_size),
                num_heads: config.num_heads,
            })
            .collect();
        let embedding = |count| EmbeddingConfig::new(count, c).with_initializer(initializer.clone()).init(device);
        Self {
            wte: embedding(config.vocab_size),
            wpe: embedding(config.max_position_embeddings),
            blocks,
            ln_f: norm(),
            config: config.clone(),
        }
    }

    /// Loads the weights of a transformers checkpoint (see the key table above).
    pub fn load(config: &GptNeoConfig, weights: &mut WeightMap) -> Result<Self, LoadError> {
        let c = config.hidden_size;
        let inner = config.inner_size();
        let mut blocks = Vec::with_capacity(config.num_layers);
        for (i, kind) in config.attention_layers().into_iter().enumerate() {
            let p = format!("transformer.h.{i}");
            blocks.push(GptNeoBlock {
                ln_1: weights.layer_norm(&format!("{p}.ln_1"), c, config.layer_norm_epsilon)?,
                query: weights.linear(&format!("{p}.attn.attention.q_proj"), c, c, false)?,
                key: weights.linear(&format!("{p}.attn.attention.k_proj"), c, c, false)?,
                value: weights.linear(&format!("{p}.attn.attention.v_proj"), c, c, false)?,
                out_proj: weights.linear(&format!("{p}.attn.attention.out_proj"), c, c, true)?,
                ln_2: weights.layer_norm(&format!("{p}.ln_2"), c, config.layer_norm_epsilon)?,
                c_fc: weights.linear(&format!("{p}.mlp.c_fc"), c, inner, true)?,
                c_proj: weights.linear(&format!("{p}.mlp.c_proj"), inner, c, true)?,
                window: (kind == AttentionKind::Local).then_some(config.window_size),
                num_heads: config.num_heads,
            });
        }
        let wte = weights.embedding("transformer.wte", config.vocab_size, c)?;
        let wpe = weights.embedding("transformer.wpe", config.max_position_embeddings, c)?;
        let ln_f = weights.layer_norm("transformer.ln_f", c, config.layer_norm_epsilon)?;
        // A saved head must equal the tied embedding; reading it marks it used.
        if weights.contains("lm_head.weight") {
            weights.take_values("lm_head.weight", &[config.vocab_size, c])?;
        }
        Ok(Self { wte, wpe, blocks, ln_f, config: config.clone() })
    }

    /// Adds every weight under its transformers key (the inverse of [`GptNeo::load`]; the tied
    /// head is not stored, as `save_pretrained` does not store it).
    pub fn export(&self, writer: &mut WeightWriter) {
        writer.embedding("transformer.wte", &self.wte);
        writer.embedding("transformer.wpe", &self.wpe);
        for (i, block) in self.blocks.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            writer.layer_norm(&format!("{p}.ln_1"), &block.ln_1);
            writer.linear(&format!("{p}.attn.attention.q_proj"), &block.query);
            writer.linear(&format!("{p}.attn.attention.k_proj"), &block.key);
            writer.linear(&format!("{p}.attn.attention.v_proj"), &block.value);
            writer.linear(&format!("{p}.attn.attention.out_proj"), &block.out_proj);
            writer.layer_norm(&format!("{p}.ln_2"), &block.ln_2);
            writer.linear(&format!("{p}.mlp.c_fc"), &block.c_fc);
            writer.linear(&format!("{p}.mlp.c_proj"), &block.c_proj);
        }
        writer.layer_norm("transformer.ln_f", &self.ln_f);
    }

    /// The config.
    pub fn config(&self) -> &GptNeoConfig {
        &self.config
    }

    /// The token embedding [V, C] (also the LM head).
    pub fn token_embedding(&self) -> &Embedding {
        &self.wte
    }

    /// The position embedding [P, C].
    pub fn position_embedding(&self) -> &Embedding {
        &self.wpe
    }

    /// Runs the new positions of `input` through the model, reading and extending `cache`.
    ///
    /// # Shapes
    /// - returns the final hidden states [B, T, C] (before the LM head).
    pub fn hidden_states(&self, input: &StepInput, cache: &mut KvCache) -> Tensor<3> {
        let device = self.wte.weight.device();
        let ids = input.ids_tensor(&device);
        let positions = input.positions_tensor(&device);
        let mut x = self.wte.forward(ids) + self.wpe.forward(positions); // [B, T, C]
        let global_mask = input.blocked_mask(None, &device);
        let local_mask = input.blocked_mask(Some(self.config.window_size), &device);
        for (index, block) in self.blocks.iter().enumerate() {
            let mask = if block.window.is_some() { local_mask.clone() } else { global_mask.clone() };
            x = block.forward(x, mask, cache, index);
        }
        self.ln_f.forward(x)
    }

    /// Logits over the vocabulary from hidden states: the tied head.
    ///
    /// # Shapes
    /// - `hidden`: [B, T, C] → [B, T, V]
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.logits_cached(hidden, &KvCache::default())
    }

    /// [`GptNeo::logits`], through `cache`'s packed weights when it has them (generation).
    pub fn logits_cached(&self, hidden: Tensor<3>, cache: &KvCache) -> Tensor<3> {
        cache.tied_head(hidden, self.wte.weight.id, || self.wte.weight.val())
    }
}

impl GptNeoBlock {
    /// # Shapes
    /// - `x`: [B, T, C] → [B, T, C]; `blocked`: [B, 1, T, S]
    fn forward(
        &self,
        x: Tensor<3>,
        blocked: burn::tensor::Tensor<4, burn::tensor::Bool>,
        cache: &mut KvCache,
        index: usize,
    ) -> Tensor<3> {
        let [batch, length, width] = x.dims();
        let heads = self.num_heads;
        let head_dim = width / heads;
        let split = |t: Tensor<3>| t.reshape([batch, length, heads, head_dim]).swap_dims(1, 2); // [B, H, T, D]
        let normed = self.ln_1.forward(x.clone());
        let query = split(cache.linear(&self.query, normed.clone()));
        let key = split(cache.linear(&self.key, normed.clone()));
        let value = split(cache.linear(&self.value, normed));
        let (key, value) = cache.append(index, key, value);
        // GPT-Neo does not scale attention scores.
        let attended = attention(query, key, value, blocked, 1.0); // [B, H, T, D]
        let attended = attended.swap_dims(1, 2).reshape([batch, length, width]);
        let x = x + cache.linear(&self.out_proj, attended);
        let hidden = gelu_new(cache.linear(&self.c_fc, self.ln_2.forward(x.clone())));
        x + cache.linear(&self.c_proj, hidden)
    }
}
