//! RoBERTa (DistilRoBERTa is its 6-layer configuration) with the sequence-classification head
//! of transformers' `RobertaForSequenceClassification`, `num_labels = 1`: a scalar score.
//!
//! Post-LayerNorm encoder layers, erf GELU, learned positions that start at `padding_idx + 1`
//! and skip padding (as transformers' `create_position_ids_from_input_ids`), and the head
//! dense -> tanh -> out_proj on the first (`<s>`) token.
//!
//! Legend: `B` batch, `T` length, `H` heads, `D` head dim, `C` width, `I` MLP width.
//!
//! HF key                                                   → field
//! `roberta.embeddings.word_embeddings.weight` [V, C]       → `embeddings.word`
//! `roberta.embeddings.position_embeddings.weight` [P, C]   → `embeddings.position`
//! `roberta.embeddings.token_type_embeddings.weight` [2?, C] → `embeddings.token_type`
//! `roberta.embeddings.LayerNorm.{weight,bias}`             → `embeddings.layer_norm`
//! `roberta.encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}` → `layers[i].{query,key,value}`
//! `roberta.encoder.layer.{i}.attention.output.dense.{weight,bias}` → `layers[i].attention_output`
//! `roberta.encoder.layer.{i}.attention.output.LayerNorm.{weight,bias}` → `layers[i].attention_norm`
//! `roberta.encoder.layer.{i}.intermediate.dense.{weight,bias}` [I, C] → `layers[i].intermediate`
//! `roberta.encoder.layer.{i}.output.dense.{weight,bias}` [C, I] → `layers[i].output`
//! `roberta.encoder.layer.{i}.output.LayerNorm.{weight,bias}` → `layers[i].output_norm`
//! `classifier.dense.{weight,bias}` [C, C]                  → `head.dense` (initialised when absent)
//! `classifier.out_proj.{weight,bias}` [1, C]               → `head.out_proj` (initialised when absent)
//! `lm_head.*`, `roberta.pooler.*`, `*.position_ids`        → ignored (a masked-LM head, an unused pooler, a buffer)

use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use policy_models::layers::attention;
use policy_models::weights::{LoadError, WeightMap, WeightWriter};
use serde::{Deserialize, Serialize};

/// RoBERTa's `config.json`, field names as transformers writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobertaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// `C`.
    pub hidden_size: usize,
    /// Encoder layers (6 for DistilRoBERTa).
    pub num_hidden_layers: usize,
    /// `H`.
    pub num_attention_heads: usize,
    /// `I`.
    pub intermediate_size: usize,
    /// Position table size (positions start at pad_token_id + 1).
    pub max_position_embeddings: usize,
    /// Token-type vocabulary (1 for RoBERTa).
    #[serde(default = "one")]
    pub type_vocab_size: usize,
    /// The padding id, which is also the position padding index.
    #[serde(default = "one_u32")]
    pub pad_token_id: u32,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Only `gelu` (erf) is implemented; every RoBERTa checkpoint uses it.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Standard deviation of initialised weights (the head, when absent).
    #[serde(default = "default_init")]
    pub initializer_range: f64,
}

impl RobertaConfig {
    /// Attention heads of [`RobertaConfig::tiny`] (its width must be a multiple of this).
    pub const TINY_HEADS: usize = 4;

    /// A small from-scratch configuration: `layers` layers of width `hidden_size` (4 heads, MLP
    /// twice as wide), for inputs of up to `max_tokens` tokens.
    pub fn tiny(vocab_size: usize, pad_token_id: u32, hidden_size: usize, layers: usize, max_tokens: usize) -> Self {
        Self {
            vocab_size,
            hidden_size,
            num_hidden_layers: layers,
            num_attention_heads: Self::TINY_HEADS,
            intermediate_size: 2 * hidden_size,
            // Positions run from pad_token_id + 1 to pad_token_id + max_tokens.
            max_position_embeddings: max_tokens + pad_token_id as usize + 1,
            type_vocab_size: 1,
            pad_token_id,
            layer_norm_eps: 1e-5,
            hidden_act: "gelu".into(),
            initializer_range: 0.02,
        }
    }

    /// The same configuration with feed-forward width `size` (unchanged when `None`).
    pub fn with_intermediate_size(mut self, size: Option<usize>) -> Self {
        self.intermediate_size = size.unwrap_or(self.intermediate_size);
        self
    }

    /// The longest input (in tokens, special tokens included) the position table holds.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings.saturating_sub(self.pad_token_id as usize + 1)
    }
}

fn one() -> usize {
    1
}
fn one_u32() -> u32 {
    1
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu".to_string()
}
fn default_init() -> f64 {
    0.02
}

/// Whether the regression head came from the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadSource {
    /// `classifier.*` was in the checkpoint.
    Loaded,
    /// It was not (a base checkpoint such as distilroberta-base): freshly initialised.
    Initialised,
}

#[derive(Module, Debug)]
struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    layer_norm: LayerNorm,
}

#[derive(Module, Debug)]
struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

#[derive(Module, Debug)]
struct RegressionHead {
    dense: Linear,
    out_proj: Linear,
}

/// A RoBERTa encoder with a one-output regression head: the reward model.
#[derive(Module, Debug)]
pub struct RobertaRegressor {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    head: RegressionHead,
    /// Per-token error logits for the auxiliary training loss
    /// ([`crate::train::RewardTrainingConfig::token_loss_weight`]); not part of the Hugging Face
    /// model, saved as `cotlab.token_head` only while present (training checkpoints).
    token_head: Option<Linear>,
    #[module(skip)]
    config: RobertaConfig,
}

impl RobertaRegressor {
    /// A freshly initialised model (normal(0, initializer_range) weights, as transformers).
    pub fn init(config: &RobertaConfig, device: &Device) -> Self {
        let initializer = Initializer::Normal { mean: 0.0, std: config.initializer_range };
        let linear = |d_in, d_out| LinearConfig::new(d_in, d_out).with_initializer(initializer.clone()).init(device);
        let norm = || LayerNormConfig::new(config.hidden_size).with_epsilon(config.layer_norm_eps).init(device);
        let embedding =
            |count| EmbeddingConfig::new(count, config.hidden_size).with_initializer(initializer.clone()).init(device);
        let c = config.hidden_size;
        let model = Self {
            embeddings: Embeddings {
                word: embedding(config.vocab_size),
                position: embedding(config.max_position_embeddings),
                token_type: embedding(config.type_vocab_size),
                layer_norm: norm(),
            },
            layers: (0..config.num_hidden_layers)
                .map(|_| EncoderLayer {
                    query: linear(c, c),
                    key: linear(c, c),
                    value: linear(c, c),
                    attention_output: linear(c, c),
                    attention_norm: norm(),
                    intermediate: linear(c, config.intermediate_size),
                    output: linear(config.intermediate_size, c),
                    output_norm: norm(),
                })
                .collect(),
            head: RegressionHead { dense: linear(c, c), out_proj: linear(c, 1) },
            token_head: None,
            config: config.clone(),
        };
        policy_models::optim::initialize_now(model)
    }

    /// Adds a freshly initialised token head (kept when it has one).
    pub fn with_token_head(mut self) -> Self {
        if self.token_head.is_none() {
            let device = self.embeddings.word.weight.device();
            let initializer = Initializer::Normal { mean: 0.0, std: self.config.initializer_range };
            let head = LinearConfig::new(self.config.hidden_size, 1).with_initializer(initializer).init(&device);
            self.token_head = Some(policy_models::optim::initialize_now(head));
        }
        self
    }

    /// Drops the token head: the plain `RobertaForSequenceClassification` that is saved for use.
    pub fn without_token_head(mut self) -> Self {
        self.token_head = None;
        self
    }

    /// Whether the model has a token head.
    pub fn has_token_head(&self) -> bool {
        self.token_head.is_some()
    }

    /// Loads a checkpoint directory (`config.json` + safetensors); the regression head is read
    /// when present and initialised when absent, and the returned [`HeadSource`] says which.
    pub fn load_dir(dir: &Path, device: &Device) -> Result<(Self, HeadSource), LoadError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| LoadError::Io { path: config_path.clone(), source })?;
        let config: RobertaConfig = serde_json::from_str(&text)
            .map_err(|error| LoadError::BadConfig { path: config_path.clone(), message: error.to_string() })?;
        if config.hidden_act != "gelu" || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(LoadError::BadConfig {
                path: config_path,
                message: format!(
                    "hidden_act `{}` (only gelu) or hidden_size {} not a multiple of num_attention_heads {}",
                    config.hidden_act, config.hidden_size, config.num_attention_heads
                ),
            });
        }
        let mut weights = WeightMap::open(dir, device)?
            .ignore_prefixes(&["lm_head.", "roberta.pooler."])
            .ignore_suffixes(&[".position_ids"]);
        let c = config.hidden_size;
        let eps = config.layer_norm_eps;
        let e = "roberta.embeddings";
        let embeddings = Embeddings {
            word: weights.embedding(&format!("{e}.word_embeddings"), config.vocab_size, c)?,
            position: weights.embedding(&format!("{e}.position_embeddings"), config.max_position_embeddings, c)?,
            token_type: weights.embedding(&format!("{e}.token_type_embeddings"), config.type_vocab_size, c)?,
            layer_norm: weights.layer_norm(&format!("{e}.LayerNorm"), c, eps)?,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("roberta.encoder.layer.{i}");
            layers.push(EncoderLayer {
                query: weights.linear(&format!("{p}.attention.self.query"), c, c, true)?,
                key: weights.linear(&format!("{p}.attention.self.key"), c, c, true)?,
                value: weights.linear(&format!("{p}.attention.self.value"), c, c, true)?,
                attention_output: weights.linear(&format!("{p}.attention.output.dense"), c, c, true)?,
                attention_norm: weights.layer_norm(&format!("{p}.attention.output.LayerNorm"), c, eps)?,
                intermediate: weights.linear(&format!("{p}.intermediate.dense"), c, config.intermediate_size, true)?,
                output: weights.linear(&format!("{p}.output.dense"), config.intermediate_size, c, true)?,
                output_norm: weights.layer_norm(&format!("{p}.output.LayerNorm"), c, eps)?,
            });
        }
        let (head, source) = if weights.contains("classifier.out_proj.weight") {
            let head = RegressionHead {
                dense: weights.linear("classifier.dense", c, c, true)?,
                out_proj: weights.linear("classifier.out_proj", c, 1, true)?,
            };
            (head, HeadSource::Loaded)
        } else {
            (Self::init(&config, device).head, HeadSource::Initialised)
        };
        let token_head = if weights.contains("cotlab.token_head.weight") {
            Some(weights.linear("cotlab.token_head", c, 1, true)?)
        } else {
            None
        };
        weights.finish()?;
        Ok((Self { embeddings, layers, head, token_head, config }, source))
    }

    /// Saves in the Hugging Face layout as a `RobertaForSequenceClassification` with one label.
    pub fn save_dir(&self, dir: &Path) -> Result<(), LoadError> {
        std::fs::create_dir_all(dir).map_err(|source| LoadError::Io { path: dir.to_path_buf(), source })?;
        let mut writer = WeightWriter::default();
        let e = "roberta.embeddings";
        writer.embedding(&format!("{e}.word_embeddings"), &self.embeddings.word);
        writer.embedding(&format!("{e}.position_embeddings"), &self.embeddings.position);
        writer.embedding(&format!("{e}.token_type_embeddings"), &self.embeddings.token_type);
        writer.layer_norm(&format!("{e}.LayerNorm"), &self.embeddings.layer_norm);
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("roberta.encoder.layer.{i}");
            writer.linear(&format!("{p}.attention.self.query"), &layer.query);
            writer.linear(&format!("{p}.attention.self.key"), &layer.key);
            writer.linear(&format!("{p}.attention.self.value"), &layer.value);
            writer.linear(&format!("{p}.attention.output.dense"), &layer.attention_output);
            writer.layer_norm(&format!("{p}.attention.output.LayerNorm"), &layer.attention_norm);
            writer.linear(&format!("{p}.intermediate.dense"), &layer.intermediate);
            writer.linear(&format!("{p}.output.dense"), &layer.output);
            writer.layer_norm(&format!("{p}.output.LayerNorm"), &layer.output_norm);
        }
        writer.linear("classifier.dense", &self.head.dense);
        writer.linear("classifier.out_proj", &self.head.out_proj);
        if let Some(token_head) = &self.token_head {
            writer.linear("cotlab.token_head", token_head);
        }
        writer.write(&dir.join("model.safetensors"))?;
        let mut config = serde_json::to_value(&self.config).expect("config serialises");
        config["model_type"] = "roberta".into();
        config["architectures"] = serde_json::json!(["RobertaForSequenceClassification"]);
        config["num_labels"] = 1.into();
        config["problem_type"] = "regression".into();
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config).expect("json"))
            .map_err(|source| LoadError::Io { path, source })
    }

    /// The configuration.
    pub fn config(&self) -> &RobertaConfig {
        &self.config
    }

    /// Scores right-padded rows: `attention_mask` marks real tokens.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: [B][T] → scores [B]
    pub fn score(&self, input_ids: &[Vec<i64>], attention_mask: &[Vec<bool>]) -> Tensor<1> {
        self.score_hidden(self.encode(input_ids, attention_mask))
    }

    /// The score of each row from its final hidden states (the head reads the first token).
    ///
    /// # Shapes
    /// - `hidden`: [B, T, C] → [B]
    pub fn score_hidden(&self, hidden: Tensor<3>) -> Tensor<1> {
        let [batch, _, width] = hidden.dims();
        let first = hidden.slice([0..batch, 0..1, 0..width]).reshape([batch, width]); // the <s> token
        let hidden = self.head.dense.forward(first).tanh();
        self.head.out_proj.forward(hidden).reshape([batch])
    }

    /// Per-token error logits from the final hidden states, when the model has a token head.
    ///
    /// # Shapes
    /// - `hidden`: [B, T, C] → [B, T]
    pub fn token_logits(&self, hidden: Tensor<3>) -> Option<Tensor<2>> {
        let [batch, length, width] = hidden.dims();
        self.token_head
            .as_ref()
            .map(|head| head.forward(hidden.reshape([batch * length, width])).reshape([batch, length]))
    }

    /// Final hidden states of right-padded rows.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: [B][T] → [B, T, C]
    pub fn encode(&self, input_ids: &[Vec<i64>], attention_mask: &[Vec<bool>]) -> Tensor<3> {
        let device = self.embeddings.word.weight.device();
        let batch = input_ids.len();
        let length = input_ids.first().map_or(0, Vec::len);
        let pad = i64::from(self.config.pad_token_id);
        // Positions as transformers: pad_token_id + 1 + (count of real tokens before), pads at pad_token_id.
        let mut positions = Vec::with_capacity(batch * length);
        let mut blocked = Vec::with_capacity(batch * length * length);
        for (row, mask) in input_ids.iter().zip(attention_mask) {
            let mut real = 0i64;
            for (&id, _) in row.iter().zip(mask) {
                let is_token = id != pad;
                real += i64::from(is_token);
                positions.push(if is_token { pad + real } else { pad });
            }
            for _query in 0..length {
                blocked.extend(mask.iter().map(|&keep| !keep));
            }
        }
        let ids: Vec<i64> = input_ids.iter().flatten().copied().collect();
        let ids: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids, [batch, length]), &device);
        let positions: Tensor<2, Int> = Tensor::from_data(TensorData::new(positions, [batch, length]), &device);
        let token_types: Tensor<2, Int> = Tensor::zeros([batch, length], &device);
        let blocked: Tensor<4, Bool> = Tensor::from_data(TensorData::new(blocked, [batch, 1, length, length]), &device);
        let mut x = self.embeddings.word.forward(ids)
            + self.embeddings.position.forward(positions)
            + self.embeddings.token_type.forward(token_types);
        x = self.embeddings.layer_norm.forward(x); // [B, T, C]
        for layer in &self.layers {
            x = layer.forward(x, blocked.clone(), self.config.num_attention_heads);
        }
        x
    }
}

impl EncoderLayer {
    /// # Shapes
    /// - `x`: [B, T, C] → [B, T, C]; `blocked`: [B, 1, T, T]
    fn forward(&self, x: Tensor<3>, blocked: Tensor<4, Bool>, heads: usize) -> Tensor<3> {
        let [batch, length, width] = x.dims();
        let head_dim = width / heads;
        let split = |t: Tensor<3>| t.reshape([batch, length, heads, head_dim]).swap_dims(1, 2);
        let query = split(self.query.forward(x.clone()));
        let key = split(self.key.forward(x.clone()));
        let value = split(self.value.forward(x.clone()));
        let attended = attention(query, key, value, blocked, 1.0 / (head_dim as f32).sqrt())
            .swap_dims(1, 2)
            .reshape([batch, length, width]);
        let x = self.attention_norm.forward(self.attention_output.forward(attended) + x);
        let hidden = gelu(self.intermediate.forward(x.clone()));
        self.output_norm.forward(self.output.forward(hidden) + x)
    }
}
