//! One type for every policy architecture, chosen by `model_type` in `config.json`, and where
//! checkpoints come from (a local directory or a hub repository).

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, FloatDType, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::decoder::Decoder;
use crate::gpt_neo::{GptNeo, GptNeoConfig};
use crate::layers::{KvCache, StepInput};
use crate::llama::LlamaConfig;
use crate::qwen2::Qwen2Config;
use crate::tokenizer::PolicyTokenizer;
use crate::weights::{LoadError, WeightMap, WeightWriter};

/// A policy architecture's configuration, as in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type", rename_all = "snake_case")]
pub enum ModelConfig {
    /// `"model_type": "gpt_neo"`.
    GptNeo(GptNeoConfig),
    /// `"model_type": "qwen2"`.
    Qwen2(Qwen2Config),
    /// `"model_type": "llama"`.
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
        let config: ModelConfig = serde_json::from_str(&text).map_err(|error| LoadError::BadConfig {
            path: path.to_path_buf(),
            message: format!("{error} (model_type must be one of gpt_neo, qwen2, llama)"),
        })?;
        config.validate().map_err(|message| LoadError::BadConfig { path: path.to_path_buf(), message })?;
        Ok(config)
    }

    /// Checks the fields against each other.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            ModelConfig::GptNeo(config) => config.validate(),
            ModelConfig::Qwen2(config) => config.spec().map(drop),
            ModelConfig::Llama(config) => config.spec().map(drop),
        }
    }

    /// `V`.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::GptNeo(config) => config.vocab_size,
            ModelConfig::Qwen2(config) => config.vocab_size,
            ModelConfig::Llama(config) => config.vocab_size,
        }
    }

    /// Number of transformer blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::GptNeo(config) => config.num_layers,
            ModelConfig::Qwen2(config) => config.num_hidden_layers,
            ModelConfig::Llama(config) => config.num_hidden_layers,
        }
    }

    /// `C`, the width of the final hidden states.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::GptNeo(config) => config.hidden_size,
            ModelConfig::Qwen2(config) => config.hidden_size,
            ModelConfig::Llama(config) => config.hidden_size,
        }
    }

    /// Standard deviation of the normal transformers initialises new weights with.
    pub fn initializer_range(&self) -> f64 {
        match self {
            ModelConfig::GptNeo(config) => config.initializer_range,
            ModelConfig::Qwen2(config) => config.initializer_range,
            ModelConfig::Llama(config) => config.initializer_range,
        }
    }

    /// Longest sequence the model supports, when its config says.
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            ModelConfig::GptNeo(config) => Some(config.max_position_embeddings),
            ModelConfig::Qwen2(config) => config.max_position_embeddings,
            ModelConfig::Llama(config) => config.max_position_embeddings,
        }
    }
}

/// The model body.
#[derive(Module, Debug)]
enum Body {
    GptNeo(GptNeo),
    Decoder(Decoder),
}

/// A causal language model of any supported architecture.
#[derive(Module, Debug)]
pub struct CausalLm {
    body: Body,
    #[module(skip)]
    config: ModelConfig,
}

impl CausalLm {
    /// A freshly initialised model.
    pub fn init(config: &ModelConfig, device: &Device) -> Result<Self, String> {
        config.validate()?;
        let body = match config {
            ModelConfig::GptNeo(neo) => Body::GptNeo(GptNeo::init(neo, device)),
            ModelConfig::Qwen2(qwen) => Body::Decoder(Decoder::init(&qwen.spec()?, device)),
            ModelConfig::Llama(llama) => Body::Decoder(Decoder::init(&llama.spec()?, device)),
        };
        Ok(crate::optim::initialize_now(Self { body, config: config.clone() }))
    }

    /// Loads `config.json` and the safetensors weights of a checkpoint directory.
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self, LoadError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let mut weights = WeightMap::open(dir, device)?.ignore_suffixes(&[
            ".attn.attention.bias",
            ".attn.attention.masked_bias",
            ".rotary_emb.inv_freq",
        ]);
        let bad_config = |message: String| LoadError::BadConfig { path: dir.join("config.json"), message };
        let body = match &config {
            ModelConfig::GptNeo(neo) => Body::GptNeo(GptNeo::load(neo, &mut weights)?),
            ModelConfig::Qwen2(qwen) => Body::Decoder(Decoder::load(&qwen.spec().map_err(bad_config)?, &mut weights)?),
            ModelConfig::Llama(llama) => {
                Body::Decoder(Decoder::load(&llama.spec().map_err(bad_config)?, &mut weights)?)
            }
        };
        weights.finish()?;
        Ok(Self { body, config })
    }

    /// [`CausalLm::load_dir`] for a checkpoint whose head is not the LM head (a reward model's
    /// `score`): returns the model and the weights it left unread, for the caller to take its
    /// head from and then `finish`. A `*ForSequenceClassification` checkpoint has no
    /// `lm_head.weight` although its config may say untied; the model is then built tied (its
    /// LM head is never used by such a caller).
    pub fn load_trunk(dir: &Path, device: &Device) -> Result<(Self, WeightMap), LoadError> {
        let mut config = ModelConfig::from_file(&dir.join("config.json"))?;
        let mut weights = WeightMap::open(dir, device)?.ignore_suffixes(&[
            ".attn.attention.bias",
            ".attn.attention.masked_bias",
            ".rotary_emb.inv_freq",
        ]);
        if !weights.contains("lm_head.weight") {
            match &mut config {
                ModelConfig::Qwen2(qwen) => qwen.tie_word_embeddings = true,
                ModelConfig::Llama(llama) => llama.tie_word_embeddings = true,
                ModelConfig::GptNeo(_) => {}
            }
        }
        let bad_config = |message: String| LoadError::BadConfig { path: dir.join("config.json"), message };
        let body = match &config {
            ModelConfig::GptNeo(neo) => Body::GptNeo(GptNeo::load(neo, &mut weights)?),
            ModelConfig::Qwen2(qwen) => Body::Decoder(Decoder::load(&qwen.spec().map_err(bad_config)?, &mut weights)?),
            ModelConfig::Llama(llama) => {
                Body::Decoder(Decoder::load(&llama.spec().map_err(bad_config)?, &mut weights)?)
            }
        };
        Ok((Self { body, config }, weights))
    }

    /// Adds every weight but the LM head to `writer` under its transformers key (LoRA-adapted
    /// weights merged): the trunk of a `*ForSequenceClassification` checkpoint.
    pub fn export_trunk(&self, writer: &mut WeightWriter) {
        self.export(writer);
        writer.remove("lm_head");
    }

    /// Loads a GGUF file (llama.cpp), dequantized to f32: what transformers'
    /// `from_pretrained(dir, gguf_file=...)` builds (see `gguf.rs`).
    pub fn load_gguf(path: &Path, device: &Device) -> Result<Self, LoadError> {
        Self::from_gguf(crate::gguf::GgufFile::open(path)?, device)
    }

    /// [`CausalLm::load_gguf`] of an opened file. Every tensor of the file must find its place:
    /// one that does not is reported as unused.
    fn from_gguf(file: crate::gguf::GgufFile, device: &Device) -> Result<Self, LoadError> {
        let path = file.path().to_path_buf();
        let bad_config = |message: String| LoadError::Gguf { path: path.clone(), message };
        let config: ModelConfig = serde_json::from_value(file.hf_config()?)
            .map_err(|error| bad_config(format!("its metadata gives no usable config: {error}")))?;
        config.validate().map_err(bad_config)?;
        let keys = file.hf_keys()?;
        let mut weights = WeightMap::from_gguf(file, keys, device);
        let body = match &config {
            ModelConfig::Qwen2(qwen) => Body::Decoder(Decoder::load(&qwen.spec().map_err(bad_config)?, &mut weights)?),
            ModelConfig::Llama(llama) => {
                Body::Decoder(Decoder::load(&llama.spec().map_err(bad_config)?, &mut weights)?)
            }
            ModelConfig::GptNeo(_) => unreachable!("GgufFile::architecture admits llama and qwen2 only"),
        };
        weights.finish()?;
        Ok(Self { body, config })
    }

    /// Saves the model in the Hugging Face layout (`config.json`, `model.safetensors` in f32,
    /// and `tokenizer.json` when a tokenizer is given), so that cotlab and transformers can both
    /// load it. Each file is written to a temporary name and renamed.
    pub fn save_dir(&self, dir: &Path, tokenizer: Option<&PolicyTokenizer>) -> Result<(), LoadError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut writer = WeightWriter::default();
        self.export(&mut writer);
        let adapted = self.has_adapters();
        if adapted {
            // Before writing anything: adapters PEFT's layout cannot hold are an error.
            self.check_adapters_exported(dir)?;
        }
        writer.write(&dir.join("model.safetensors"))?;
        if adapted {
            crate::lora::write_peft_adapter(&dir.join(crate::lora::ADAPTER_SUBDIR), writer.linears(), None)?;
        }
        let mut config = serde_json::to_value(&self.config).expect("configs serialise");
        let architecture = match self.config {
            ModelConfig::GptNeo(_) => "GPTNeoForCausalLM",
            ModelConfig::Qwen2(_) => "Qwen2ForCausalLM",
            ModelConfig::Llama(_) => "LlamaForCausalLM",
        };
        config["architectures"] = serde_json::json!([architecture]);
        config["tie_word_embeddings"] = serde_json::json!(match &self.body {
            Body::GptNeo(_) => true,
            Body::Decoder(model) => model.lm_head().is_none(),
        });
        let config_path = dir.join("config.json");
        let temporary = dir.join("config.json.tmp");
        std::fs::write(&temporary, serde_json::to_string_pretty(&config).expect("json")).map_err(io(&temporary))?;
        std::fs::rename(&temporary, &config_path).map_err(io(&config_path))?;
        if let Some(tokenizer) = tokenizer {
            let path = dir.join("tokenizer.json");
            tokenizer
                .save(&path)
                .map_err(|error| LoadError::BadConfig { path: path.clone(), message: error.to_string() })?;
            // The special tokens by name, so that transformers' AutoTokenizer and cotlab both
            // find them.
            let text = |id: Option<u32>| id.and_then(|id| tokenizer.inner().id_to_token(id));
            let tokenizer_config = serde_json::json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": text(tokenizer.bos_id),
                "eos_token": text(tokenizer.eos_ids.first().copied()),
                "pad_token": text(tokenizer.pad_id),
            });
            let path = dir.join("tokenizer_config.json");
            std::fs::write(&path, serde_json::to_string_pretty(&tokenizer_config).expect("json")).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Adds every weight to `writer` under its transformers key.
    pub(crate) fn export(&self, writer: &mut WeightWriter) {
        match &self.body {
            Body::GptNeo(model) => model.export(writer),
            Body::Decoder(model) => model.export(writer),
        }
    }

    /// Attaches LoRA adapters (burn's `apply_lora`) to the weights whose parameter path matches
    /// `settings.target_regex`, freezing every base parameter: only the adapters train.
    /// Saving writes the merged weights (base + scale A B), so the saved checkpoint is a plain
    /// model that transformers and cotlab load without adapters, and the adapters in PEFT's
    /// layout in its `adapter/` folder (see [`crate::lora`]).
    pub fn with_lora(self, settings: &LoraSettings) -> Result<Self, String> {
        settings.validate().map_err(|error| format!("lora.{error}"))?;
        let group = burn::module::ParamGroup::from_regex(&settings.target_regex)
            .map_err(|error| format!("lora.target_regex `{}`: {error:?}", settings.target_regex))?;
        let adapted = self.apply_lora(burn::module::Lora::new(settings.rank, settings.alpha).set_param_group(group));
        Ok(crate::optim::initialize_now(adapted))
    }

    /// Computes in `dtype` from now on: every weight is cast to it, and so is every activation
    /// (bf16 halves memory and runs on GPU tensor cores; transformers' `torch_dtype=bfloat16`).
    /// Logits and hidden states are returned in f32, so sampling, log-probs and losses keep f32
    /// precision (as TRL upcasts logits). The CPU default stays f32; flex computes bf16 too, which
    /// is how the option is tested without a GPU. This is for inference: a model trained in bf16
    /// loses its updates to rounding, so trainers keep f32 master weights and compute on a bf16
    /// copy instead ([`crate::optim::TrainDtype`]).
    pub fn with_compute_dtype(self, dtype: FloatDType) -> Self {
        struct Recast(FloatDType);
        impl ModuleMapper for Recast {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let dtype = self.0;
                // New leaves: a cast inside the graph would tie every later loss to one node.
                param.map(|tensor| {
                    let trained = tensor.is_require_grad();
                    let cast = tensor.cast(dtype).detach();
                    if trained { cast.require_grad() } else { cast }
                })
            }
        }
        self.map(&mut Recast(dtype))
    }

    /// The dtype weights and activations are computed in: the parameters' (a training pass's
    /// working copy is a cast of the whole model, see [`crate::optim::TrainDtype`]).
    pub fn compute_dtype(&self) -> FloatDType {
        let embedding = match &self.body {
            Body::GptNeo(model) => model.token_embedding(),
            Body::Decoder(model) => model.token_embedding(),
        };
        // The stored weight, not a reparameterised (LoRA) value: no product just to read a dtype.
        embedding.weight.base().dtype().into()
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// An empty key/value cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers())
    }

    /// Final hidden states of the new positions of `input`, reading and extending `cache`.
    ///
    /// # Shapes
    /// - returns [B, T, C]
    pub fn hidden_states(&self, input: &StepInput, cache: &mut KvCache) -> Tensor<3> {
        let hidden = match &self.body {
            Body::GptNeo(model) => model.hidden_states(input, cache),
            Body::Decoder(model) => model.hidden_states(input, cache),
        };
        // A cast to the dtype a tensor already has returns it unchanged.
        hidden.cast(FloatDType::F32)
    }

    /// Final hidden states of prompts and of the completions continuing them, each prompt run
    /// once (see [`crate::prefix`]); `None` for GPT-Neo, whose callers take the full path.
    ///
    /// # Shapes
    /// - `prompts`: [P, Tp]; `groups`: [R]; `completions`: [R, Tc] over [R, Tp + Tc] keys
    /// - returns (prompt hidden states [P, Tp, C], completion hidden states [R, Tc, C])
    pub fn shared_prefix_hidden_states(
        &self,
        prompts: &StepInput,
        groups: &[usize],
        completions: &StepInput,
    ) -> Option<(Tensor<3>, Tensor<3>)> {
        match &self.body {
            // GPT-Neo's local layers would need the window across the prompt/completion seam.
            Body::GptNeo(_) => None,
            Body::Decoder(model) => {
                let (prompt, completion) = model.shared_prefix_hidden_states(prompts, groups, completions);
                Some((prompt.cast(FloatDType::F32), completion.cast(FloatDType::F32)))
            }
        }
    }

    /// Logits from hidden states.
    ///
    /// # Shapes
    /// - `hidden`: [B, T, C] → [B, T, V]
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.logits_cached(hidden, &KvCache::default())
    }

    /// [`CausalLm::logits`] through `cache`'s packed weights when it has them (generation).
    fn logits_cached(&self, hidden: Tensor<3>, cache: &KvCache) -> Tensor<3> {
        let hidden = hidden.cast(self.compute_dtype());
        let logits = match &self.body {
            Body::GptNeo(model) => model.logits_cached(hidden, cache),
            Body::Decoder(model) => model.logits_cached(hidden, cache),
        };
        logits.cast(FloatDType::F32)
    }

    /// The LM head's weight as [`crate::fused::head_log_probs`] takes it: ([C, V], false) for a
    /// `Linear` head, ([V, C], true) for a head tied to the token embeddings; `None` for a head
    /// with a bias (no checkpoint of the three architectures has one).
    fn head_weight(&self) -> Option<(Tensor<2>, bool)> {
        match &self.body {
            Body::GptNeo(model) => Some((model.token_embedding().weight.val(), true)),
            Body::Decoder(model) => match model.lm_head() {
                Some(head) if head.bias.is_some() => None,
                Some(head) => Some((head.weight.val(), false)),
                None => Some((model.token_embedding().weight.val(), true)),
            },
        }
    }

    /// Log-probabilities of `targets` and entropies of softmax(logits / temperature) at hidden
    /// states `hidden` (from [`CausalLm::hidden_states`]), through the fused head: the [R, V]
    /// logits are never materialised (see [`crate::fused::head_log_probs`]). Differentiable
    /// w.r.t. the hidden states and the head, both outputs.
    ///
    /// # Shapes
    /// - `hidden`: [R, C], `targets`: [R] → (log_probs [R], entropies [R])
    pub fn token_log_probs(
        &self,
        hidden: Tensor<2>,
        targets: Tensor<1, Int>,
        temperature: f32,
    ) -> (Tensor<1>, Tensor<1>) {
        match self.head_weight() {
            Some((head, transposed)) => crate::fused::head_log_probs(hidden, head, transposed, targets, temperature),
            None => {
                let rows = hidden.dims()[0];
                let logits = self.logits(hidden.unsqueeze::<3>()).reshape([rows as i32, -1]) / temperature; // [R, V]
                let log_p = crate::fused::log_softmax_last(logits);
                let chosen = log_p.clone().gather(1, targets.reshape([rows, 1])).reshape([rows]);
                (chosen, -(log_p.clone().exp() * log_p).sum_dim(1).reshape([rows]))
            }
        }
    }

    /// Logits of the new positions of `input`.
    ///
    /// # Shapes
    /// - returns [B, T, V]
    pub fn forward(&self, input: &StepInput, cache: &mut KvCache) -> Tensor<3> {
        let hidden = self.hidden_states(input, cache);
        self.logits_cached(hidden, cache)
    }

    /// Logits of the last position of `input` only: what a prompt step of generation reads.
    /// The LM head over every prompt position would be [B, P, V] (for SmolLM2's vocabulary,
    /// 64 rows of 150 prompt tokens are 1.9 GB and 0.5 TFLOP) to keep one position of it.
    ///
    /// # Shapes
    /// - returns [B, 1, V]
    pub fn forward_last(&self, input: &StepInput, cache: &mut KvCache) -> Tensor<3> {
        let hidden = self.hidden_states(input, cache);
        let [batch, length, width] = hidden.dims();
        self.logits_cached(hidden.slice([0..batch, length - 1..length, 0..width]), cache)
    }
}

/// LoRA adapters (Hu et al., 2021), as Minimal-GRPO trains them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSettings {
    /// Rank of the A B factors. Default 16 (Minimal-GRPO).
    pub rank: usize,
    /// Scale numerator: the update is (alpha / rank) A B. Default 32 (Minimal-GRPO).
    pub alpha: f64,
    /// Regular expression over parameter paths; default: every attention and MLP projection of
    /// the three architectures (embeddings and norms stay frozen).
    pub target_regex: String,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            target_regex: r"(query|key|value|out_proj|c_fc|c_proj|q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
                .to_string(),
        }
    }
}

/// Where a checkpoint comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// A local directory in the Hugging Face layout.
    Dir(PathBuf),
    /// A GGUF file (llama.cpp), converted once into a Hugging Face directory in the cache.
    Gguf(PathBuf),
    /// A model repository on the hub, fetched into its cache.
    Hub {
        /// Repository id (`EleutherAI/gpt-neo-125m`).
        repo: String,
        /// Branch, tag or commit.
        revision: String,
    },
}

impl ModelSource {
    /// Reads `text` as an existing directory, a `.gguf` file, else as a hub id
    /// `owner/name[@revision]`. A reference that looks like a path (it starts with `.`, `/` or
    /// `~`, or names something that exists) is a path, and must be a directory or a `.gguf`
    /// file: a mistyped directory is an error here rather than a hub id to download.
    pub fn parse(text: &str) -> Result<Self, LoadError> {
        let path = Path::new(text);
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        if path.extension().is_some_and(|extension| extension.eq_ignore_ascii_case("gguf")) {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        let bad = |message: String| LoadError::BadReference { reference: text.to_string(), message };
        if path.exists() {
            return Err(bad("is a file, not a checkpoint directory (with config.json) or a .gguf file".to_string()));
        }
        if text.starts_with(['.', '/', '~']) {
            let tilde = if text.starts_with('~') { " (`~` is not expanded: write the full path)" } else { "" };
            return Err(bad(format!(
                "was read as a path (it starts with '.', '/' or '~') and does not exist{tilde}; give an existing checkpoint directory or .gguf file, or a hub id `owner/name[@revision]`"
            )));
        }
        let (repo, revision) = text.split_once('@').unwrap_or((text, "main"));
        let hub_id = repo.split_once('/').is_some_and(|(owner, name)| {
            let part = |part: &str| {
                !part.is_empty()
                    && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    && !part.starts_with('.')
            };
            part(owner) && part(name)
        });
        if !hub_id || revision.is_empty() {
            return Err(bad(
                "is neither an existing path nor a hub id `owner/name[@revision]`; check the spelling, or start a relative path with ./".to_string(),
            ));
        }
        Ok(ModelSource::Hub { repo: repo.to_string(), revision: revision.to_string() })
    }

    /// A local directory holding the checkpoint: the directory itself, or the hub cache's
    /// snapshot after fetching `config.json`, the tokenizer and generation files that exist,
    /// and the weights (one file or every shard of the index).
    pub fn resolve(&self) -> Result<PathBuf, LoadError> {
        let (repo, revision) = match self {
            ModelSource::Dir(dir) => {
                if !dir.join("config.json").is_file() {
                    return Err(LoadError::BadConfig {
                        path: dir.join("config.json"),
                        message: "missing: a checkpoint directory needs config.json".to_string(),
                    });
                }
                return Ok(dir.clone());
            }
            ModelSource::Gguf(path) => return gguf_as_dir(path, &cache_dir()),
            ModelSource::Hub { repo, revision } => (repo, revision),
        };
        let fetch = |file: &str| tasks::hub::fetch(repo, tasks::hub::RepoType::Model, revision, file);
        let hub_error = |error: tasks::hub::HubError| LoadError::BadConfig {
            path: PathBuf::from(format!("{repo}@{revision}")),
            message: format!(
                "{error}. Without network access, copy the checkpoint directory here and pass its path instead of the hub id"
            ),
        };
        let config = fetch("config.json").map_err(hub_error)?;
        for optional in [
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "vocab.json",
            "merges.txt",
            "special_tokens_map.json",
        ] {
            // Checkpoints carry different subsets of these; a missing one is not an error.
            let _ = fetch(optional);
        }
        match fetch("model.safetensors") {
            Ok(_) => {}
            Err(_) => {
                let index = fetch("model.safetensors.index.json").map_err(hub_error)?;
                for shard in crate::weights::shard_files(&index)? {
                    fetch(&shard).map_err(hub_error)?;
                }
            }
        }
        Ok(config.parent().expect("a fetched file has a parent directory").to_path_buf())
    }
}

/// Where converted checkpoints are kept: `$COTLAB_CACHE`, else `$XDG_CACHE_HOME/cotlab`, else
/// `~/.cache/cotlab`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("COTLAB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("cotlab");
    }
    std::env::var_os("HOME")
        .map_or_else(|| std::env::temp_dir().join("cotlab-cache"), |home| PathBuf::from(home).join(".cache/cotlab"))
}

/// The sha256 of a file, in hex.
pub fn file_sha256(path: &Path) -> Result<String, LoadError> {
    use sha2::Digest;
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io)?;
    Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect())
}

/// The Hugging Face directory of a GGUF file: `config.json`, `model.safetensors` (f32),
/// `tokenizer.json` and `tokenizer_config.json` (special tokens, BOS rule, chat template), in
/// `cache/gguf/<stem>-<sha256 prefix>` (the cache is [`cache_dir`] for [`ModelSource::resolve`]). Converted once: the directory is written under a
/// temporary name and renamed, so its presence means it is complete. Every consumer of
/// directories (the study, `generate`, `logits`, `bench`) then reads a GGUF file unchanged, and so
/// does transformers.
pub fn gguf_as_dir(path: &Path, cache: &Path) -> Result<PathBuf, LoadError> {
    if !path.is_file() {
        return Err(LoadError::Gguf { path: path.to_path_buf(), message: "no such file".to_string() });
    }
    let stem = path.file_stem().and_then(|stem| stem.to_str()).unwrap_or("model");
    let digest = file_sha256(path)?;
    // The conversion's version is part of the name, so that a fix to it reaches files converted
    // before the fix.
    let name = format!("{stem}-{}-v{GGUF_CONVERSION_VERSION}", &digest[..16]);
    let dir = cache.join("gguf").join(&name);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    let file = crate::gguf::GgufFile::open(path)?;
    let tokenizer = file.tokenizer_json()?;
    let tokenizer_config = file.tokenizer_config_json();
    let model = CausalLm::from_gguf(file, &Device::flex())?;
    let temporary = dir.with_file_name(format!("{name}.tmp-{}", std::process::id()));
    let write = || -> Result<(), LoadError> {
        model.save_dir(&temporary, None)?;
        for (file_name, value) in [("tokenizer.json", &tokenizer), ("tokenizer_config.json", &tokenizer_config)] {
            let at = temporary.join(file_name);
            let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
            std::fs::write(&at, text).map_err(|source| LoadError::Io { path: at.clone(), source })?;
        }
        Ok(())
    };
    if let Err(error) = write() {
        let _ = std::fs::remove_dir_all(&temporary);
        return Err(error);
    }
    match std::fs::rename(&temporary, &dir) {
        Ok(()) => Ok(dir),
        // Another process converted the same file meanwhile: keep its copy.
        Err(_) if dir.join("config.json").is_file() => {
            let _ = std::fs::remove_dir_all(&temporary);
            Ok(dir)
        }
        Err(source) => {
            let _ = std::fs::remove_dir_all(&temporary);
            Err(LoadError::Io { path: dir, source })
        }
    }
}

/// Bumped whenever [`gguf_as_dir`]'s output changes.
const GGUF_CONVERSION_VERSION: u32 = 1;
