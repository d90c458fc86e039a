//! The decoder body that Qwen2 and Llama share: token embedding, pre-RMSNorm blocks of rotary
//! grouped-query attention and a SwiGLU MLP, a final RMSNorm and an LM head (tied or not).
//! `qwen2.rs` and `llama.rs` hold the configs and say which biases exist; this file holds the
//! computation, written once. [`Decoder::shared_prefix_hidden_states`] runs prompts once and
//! the completions that continue them over their keys and values ([`crate::prefix`]).
//!
//! Legend: `B` batch, `T` new positions, `S` key positions, `H` query heads, `K` key/value
//! heads, `D` head dim, `C` width, `I` MLP width, `V` vocabulary; with shared prefixes, `P`
//! prompts of `Tp` positions, `R` completion rows of `Tc`.
//!
//! HF key (both architectures)                         → field
//! `model.embed_tokens.weight` [V, C]                  → `embed_tokens`
//! `model.layers.{i}.input_layernorm.weight` [C]       → `layers[i].input_layernorm`
//! `model.layers.{i}.self_attn.q_proj.{weight,bias}` [H*D, C] → `layers[i].q_proj`
//! `model.layers.{i}.self_attn.{k,v}_proj.{weight,bias}` [K*D, C] → `layers[i].{k,v}_proj`
//! `model.layers.{i}.self_attn.o_proj.weight` [C, H*D] → `layers[i].o_proj`
//! `model.layers.{i}.post_attention_layernorm.weight`  → `layers[i].post_attention_layernorm`
//! `model.layers.{i}.mlp.{gate,up}_proj.weight` [I, C] → `layers[i].{gate,up}_proj`
//! `model.layers.{i}.mlp.down_proj.weight` [C, I]      → `layers[i].down_proj`
//! `model.norm.weight` [C]                             → `norm`
//! `lm_head.weight` [V, C]                             → `lm_head` (absent when tied)
//! `model.layers.{i}.self_attn.rotary_emb.inv_freq`    → ignored (a buffer in old checkpoints)

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::activation::silu;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde_json::Value;

use crate::layers::{KvCache, Llama3Scaling, Rope, StepInput, attention};
use crate::weights::{LoadError, WeightMap, WeightWriter};

/// Everything the shared decoder needs to know, derived from an architecture's config.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSpec {
    /// `V`.
    pub vocab_size: usize,
    /// `C`.
    pub hidden_size: usize,
    /// `I`.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_layers: usize,
    /// `H`.
    pub num_heads: usize,
    /// `K`.
    pub num_kv_heads: usize,
    /// `D`.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// LM head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2: yes; Llama: `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o (Llama's `attention_bias`; Qwen2: no).
    pub o_bias: bool,
    /// Biases in the MLP (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Rotary embedding frequencies.
    pub rope: Rope,
    /// Standard deviation of freshly initialised weights.
    pub initializer_range: f64,
}

impl DecoderSpec {
    /// Checks the head arithmetic.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} is odd; rotary embeddings need an even head dimension", self.head_dim));
        }
        Ok(())
    }
}

/// Reads the rotary settings from either config style: the older `rope_theta` + `rope_scaling`
/// (as the published Qwen2.5 and Llama 3.2 checkpoints have), or transformers 5's
/// `rope_parameters` (with `rope_theta` inside).
pub fn rope_from_config(
    head_dim: usize,
    rope_theta: Option<f64>,
    rope_scaling: Option<&Value>,
    rope_parameters: Option<&Value>,
) -> Result<Rope, String> {
    let parameters = rope_parameters.or(rope_scaling).filter(|value| !value.is_null());
    let theta = parameters.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(rope_theta).unwrap_or(10_000.0);
    let rope_type = parameters
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match rope_type {
        "default" => Ok(Rope::new(head_dim, theta)),
        "llama3" => {
            let field = |name: &str| {
                parameters
                    .and_then(|p| p.get(name))
                    .and_then(Value::as_f64)
                    .ok_or_else(|| format!("rope scaling of type llama3 needs a numeric `{name}`"))
            };
            let scaling = Llama3Scaling {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            };
            Ok(Rope::llama3(head_dim, theta, scaling))
        }
        other => Err(format!("rope type `{other}` is not supported (supported: default, llama3)")),
    }
}

/// One decoder block.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// A rotary grouped-query decoder with its LM head.
#[derive(Module, Debug)]
pub struct Decoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    #[module(skip)]
    spec: DecoderSpec,
}

impl Decoder {
    /// A freshly initialised decoder (normal(0, initializer_range) weights, as transformers).
    pub fn init(spec: &DecoderSpec, device: &Device) -> Self {
        let initializer = Initializer::Normal { mean: 0.0, std: spec.initializer_range };
        let linear = |d_in, d_out, bias| {
            LinearConfig::new(d_in, d_out).with_bias(bias).with_initializer(initializer.clone()).init(device)
        };
        let norm = || RmsNormConfig::new(spec.hidden_size).with_epsilon(spec.rms_norm_eps).init(device);
        let (c, d, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
        let layers = (0..spec.num_layers)
            .map(|_| DecoderLayer {
                input_layernorm: norm(),
                q_proj: linear(c, spec.num_heads * d, spec.qkv_bias),
                k_proj: linear(c, spec.num_kv_heads * d, spec.qkv_bias),
                v_proj: linear(c, spec.num_kv_heads * d, spec.qkv_bias),
                o_proj: linear(spec.num_heads * d, c, spec.o_bias),
                post_attention_layernorm: norm(),
                gate_proj: linear(c, i, spec.mlp_bias),
                up_proj: linear(c, i, spec.mlp_bias),
                down_proj: linear(i, c, spec.mlp_bias),
            })
            .collect();
        Self {
            embed_tokens: EmbeddingConfig::new(spec.vocab_size, c).with_initializer(initializer.clone()).init(device),
            layers,
            norm: norm(),
            lm_head: (!spec.tie_word_embeddings).then(|| linear(c, spec.vocab_size, false)),
            spec: spec.clone(),
        }
    }

    /// Loads a transformers checkpoint (see the key table above).
    pub fn load(spec: &DecoderSpec, weights: &mut WeightMap) -> Result<Self, LoadError> {
        let (c, d, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
        let eps = spec.rms_norm_eps;
        let mut layers = Vec::with_capacity(spec.num_layers);
        for index in 0..spec.num_layers {
            let p = format!("model.layers.{index}");
            layers.push(DecoderLayer {
                input_layernorm: weights.rms_norm(&format!("{p}.input_layernorm"), c, eps)?,
                q_proj: weights.linear(&format!("{p}.self_attn.q_proj"), c, spec.num_heads * d, spec.qkv_bias)?,
                k_proj: weights.linear(&format!("{p}.self_attn.k_proj"), c, spec.num_kv_heads * d, spec.qkv_bias)?,
                v_proj: weights.linear(&format!("{p}.self_attn.v_proj"), c, spec.num_kv_heads * d, spec.qkv_bias)?,
                o_proj: weights.linear(&format!("{p}.self_attn.o_proj"), spec.num_heads * d, c, spec.o_bias)?,
                post_attention_layernorm: weights.rms_norm(&format!("{p}.post_attention_layernorm"), c, eps)?,
                gate_proj: weights.linear(&format!("{p}.mlp.gate_proj"), c, i, spec.mlp_bias)?,
                up_proj: weights.linear(&format!("{p}.mlp.up_proj"), c, i, spec.mlp_bias)?,
                down_proj: weights.linear(&format!("{p}.mlp.down_proj"), i, c, spec.mlp_bias)?,
            });
        }
        let embed_tokens = weights.embedding("model.embed_tokens", spec.vocab_size, c)?;
        let norm = weights.rms_norm("model.norm", c, eps)?;
        let lm_head = if spec.tie_word_embeddings {
            // Some tied checkpoints still store the head; it equals the embedding.
            if weights.contains("lm_head.weight") {
                weights.take_values("lm_head.weight", &[spec.vocab_size, c])?;
            }
            None
        } else {
            Some(weights.linear("lm_head", c, spec.vocab_size, false)?)
        };
        Ok(Self { embed_tokens, layers, norm, lm_head, spec: spec.clone() })
    }

    /// Adds every weight under its transformers key (the inverse of [`Decoder::load`]).
    pub fn export(&self, writer: &mut WeightWriter) {
        writer.embedding("model.embed_tokens", &self.embed_tokens);
        for (index, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{index}");
            writer.rms_norm(&format!("{p}.input_layernorm"), &layer.input_layernorm);
            writer.linear(&format!("{p}.self_attn.q_proj"), &layer.q_proj);
            writer.linear(&format!("{p}.self_attn.k_proj"), &layer.k_proj);
            writer.linear(&format!("{p}.self_attn.v_proj"), &layer.v_proj);
            writer.linear(&format!("{p}.self_attn.o_proj"), &layer.o_proj);
            writer.rms_norm(&format!("{p}.post_attention_layernorm"), &layer.post_attention_layernorm);
            writer.linear(&format!("{p}.mlp.gate_proj"), &layer.gate_proj);
            writer.linear(&format!("{p}.mlp.up_proj"), &layer.up_proj);
            writer.linear(&format!("{p}.mlp.down_proj"), &layer.down_proj);
        }
        writer.rms_norm("model.norm", &self.norm);
        if let Some(head) = &self.lm_head {
            writer.linear("lm_head", head);
        }
    }

    /// The spec.
    pub fn spec(&self) -> &DecoderSpec {
        &self.spec
    }

    /// The token embedding [V, C].
    pub fn token_embedding(&self) -> &Embedding {
        &self.embed_tokens
    }

    /// The untied LM head, if any.
    pub fn lm_head(&self) -> Option<&Linear> {
        self.lm_head.as_ref()
    }

    /// Runs the new positions of `input`, reading and extending `cache`.
    ///
    /// # Shapes
    /// - returns the final hidden states [B, T, C].
    pub fn hidden_states(&self, input: &StepInput, cache: &mut KvCache) -> Tensor<3> {
        let device = self.embed_tokens.weight.device();
        let mut x = self.embed_tokens.forward(input.ids_tensor(&device)); // [B, T, C]
        let (cos, sin) = self.spec.rope.cos_sin(input.positions_tensor(&device)); // [B, 1, T, D]
        let blocked = input.blocked_mask(None, &device);
        for (index, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, &self.spec, (cos.clone(), sin.clone()), blocked.clone(), cache, index);
        }
        self.norm.forward(x)
    }

    /// The final hidden states of prompts and of the completions that continue them, each
    /// prompt run once ([`crate::prefix`]): per block, the completions' queries attend over
    /// their prompt's keys and values (selected for each row, so the backward pass sums each
    /// prompt's gradients over its rows) followed by their own.
    ///
    /// # Shapes
    /// - `prompts`: [P, Tp]; `groups`: [R], the prompt of each completion row; `completions`:
    ///   [R, Tc] new positions over [R, Tp + Tc] keys
    /// - returns (prompt hidden states [P, Tp, C], completion hidden states [R, Tc, C])
    pub fn shared_prefix_hidden_states(
        &self,
        prompts: &StepInput,
        groups: &[usize],
        completions: &StepInput,
    ) -> (Tensor<3>, Tensor<3>) {
        let device = self.embed_tokens.weight.device();
        let plain = KvCache::default();
        let rows = Tensor::<1, Int>::from_data(
            TensorData::new(groups.iter().map(|&g| g as i64).collect::<Vec<_>>(), [groups.len()]),
            &device,
        );
        let mut prompt_x = self.embed_tokens.forward(prompts.ids_tensor(&device)); // [P, Tp, C]
        let mut completion_x = self.embed_tokens.forward(completions.ids_tensor(&device)); // [R, Tc, C]
        let prompt_rope = self.spec.rope.cos_sin(prompts.positions_tensor(&device));
        let completion_rope = self.spec.rope.cos_sin(completions.positions_tensor(&device));
        let prompt_blocked = prompts.blocked_mask(None, &device); // [P, 1, Tp, Tp]
        let completion_blocked = completions.blocked_mask(None, &device); // [R, 1, Tc, Tp + Tc]
        for layer in &self.layers {
            let (query, key, value) = layer.project(prompt_x.clone(), &self.spec, prompt_rope.clone(), &plain);
            let (c_query, c_key, c_value) =
                layer.project(completion_x.clone(), &self.spec, completion_rope.clone(), &plain);
            // [R, K, Tp + Tc, D]: each row's prompt keys, then its own.
            let c_key = Tensor::cat(vec![key.clone().select(0, rows.clone()), c_key], 2);
            let c_value = Tensor::cat(vec![value.clone().select(0, rows.clone()), c_value], 2);
            prompt_x = layer.attend(prompt_x, &self.spec, query, key, value, prompt_blocked.clone(), &plain);
            completion_x =
                layer.attend(completion_x, &self.spec, c_query, c_key, c_value, completion_blocked.clone(), &plain);
        }
        (self.norm.forward(prompt_x), self.norm.forward(completion_x))
    }

    /// Logits from hidden states.
    ///
    /// # Shapes
    /// - `hidden`: [B, T, C] → [B, T, V]
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.logits_cached(hidden, &KvCache::default())
    }

    /// [`Decoder::logits`], through `cache`'s packed weights when it has them (generation).
    pub fn logits_cached(&self, hidden: Tensor<3>, cache: &KvCache) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => cache.head(head, hidden),
            None => cache.tied_head(hidden, self.embed_tokens.weight.id, || self.embed_tokens.weight.val()),
        }
    }
}

impl DecoderLayer {
    /// # Shapes
    /// - `x`: [B, T, C] → [B, T, C]; cos/sin: [B, 1, T, D]; `blocked`: [B, 1, T, S]
    fn forward(
        &self,
        x: Tensor<3>,
        spec: &DecoderSpec,
        rope: (Tensor<4>, Tensor<4>),
        blocked: Tensor<4, Bool>,
        cache: &mut KvCache,
        index: usize,
    ) -> Tensor<3> {
        let (query, key, value) = self.project(x.clone(), spec, rope, cache);
        let (key, value) = cache.append(index, key, value);
        self.attend(x, spec, query, key, value, blocked, cache)
    }

    /// The rotated queries [B, H, T, D] and keys [B, K, T, D], and the values [B, K, T, D], of `x` [B, T, C].
    fn project(
        &self,
        x: Tensor<3>,
        spec: &DecoderSpec,
        (cos, sin): (Tensor<4>, Tensor<4>),
        cache: &KvCache,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [batch, length, _] = x.dims();
        let split = |t: Tensor<3>, heads: usize| t.reshape([batch, length, heads, spec.head_dim]).swap_dims(1, 2);
        let normed = self.input_layernorm.forward(x);
        let query = split(cache.linear(&self.q_proj, normed.clone()), spec.num_heads); // [B, H, T, D]
        let key = split(cache.linear(&self.k_proj, normed.clone()), spec.num_kv_heads); // [B, K, T, D]
        let value = split(cache.linear(&self.v_proj, normed), spec.num_kv_heads);
        (Rope::apply(query, cos.clone(), sin.clone()), Rope::apply(key, cos, sin), value)
    }

    /// The rest of the block after the projections: attention of `query` [B, H, T, D] over
    /// `key`, `value` [B, K, S, D] (`blocked`: [B, 1, T, S]), the residual, the MLP.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        x: Tensor<3>,
        spec: &DecoderSpec,
        query: Tensor<4>,
        key: Tensor<4>,
        value: Tensor<4>,
        blocked: Tensor<4, Bool>,
        cache: &KvCache,
    ) -> Tensor<3> {
        let [batch, length, width] = x.dims();
        let scale = 1.0 / (spec.head_dim as f32).sqrt();
        let attended = attention(query, key, value, blocked, scale) // [B, H, T, D]
            .swap_dims(1, 2)
            .reshape([batch, length, spec.num_heads * spec.head_dim]);
        let x = x + cache.linear(&self.o_proj, attended);
        let normed = self.post_attention_layernorm.forward(x.clone());
        let mlp = cache.linear(
            &self.down_proj,
            silu(cache.linear(&self.gate_proj, normed.clone())) * cache.linear(&self.up_proj, normed),
        );
        debug_assert_eq!(mlp.dims()[2], width);
        x + mlp
    }
}
