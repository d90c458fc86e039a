//! The study file: what `cargo xtask compare` runs. TOML; unknown fields are errors; every
//! section has defaults so a study names only what it changes.
//!
//! A study is a matrix: method x reward source x seed (methods that train no policy with
//! rewards, such as few-shot prompting, run once per seed).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use policy_models::BackendKind;
use policy_models::LoraSettings;
use policy_models::presets::Preset;
use prompting::Template;
use rl_algos::OptimSettings;
use rl_algos::rewards::RewardKind;
use serde::{Deserialize, Serialize};
use tasks::gsm8k::{Gsm8kOptions, Gsm8kSource};
use tasks::synthetic::SyntheticConfig;

/// A whole study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Study {
    /// Name; outputs go to `reports/<name>/`.
    pub name: String,
    /// burn backend. Default flex (CPU).
    #[serde(default)]
    pub backend: BackendKind,
    /// Seeds; every cell runs once per seed. Default [0, 1, 2].
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// The problems.
    #[serde(deserialize_with = "deserialize_task")]
    pub task: TaskSpec,
    /// The base policy.
    pub policy: PolicySpec,
    /// The reward model, when a reward source uses one.
    #[serde(default, deserialize_with = "deserialize_reward_model")]
    pub reward_model: Option<RewardModelSpec>,
    /// Named reward sources.
    #[serde(default)]
    pub reward_sources: BTreeMap<String, RewardSourceSpec>,
    /// Named methods.
    #[serde(deserialize_with = "deserialize_methods")]
    pub methods: BTreeMap<String, MethodSpec>,
    /// How every cell is evaluated.
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    /// An RL cell writes a checkpoint (`cells/<id>/checkpoint/`: the policy or its adapters, the
    /// optimizer state and the runner's state) every this many steps, and a rerun of an
    /// interrupted cell resumes from it with the results of an uninterrupted run. 0: never (an
    /// interrupted cell starts over). Default 10. Each checkpoint writes the policy's weights (merged,
    /// with the adapters beside them under LoRA) and AdamW's two moments of every trained weight:
    /// for full fine-tuning of a 135M model about 1.6 GB (a few seconds), under LoRA the weights
    /// and a few MB.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
}

fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2]
}

fn default_checkpoint_every() -> u64 {
    10
}

/// Where problems come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskSpec {
    /// Synthetic arithmetic.
    Synthetic {
        /// Generator settings.
        #[serde(default)]
        synthetic: SyntheticConfig,
    },
    /// GSM8K.
    Gsm8k {
        /// Hub repository or local path. Default the `openai/gsm8k` hub repository.
        #[serde(default)]
        source: Gsm8kSource,
        /// Parsing options.
        #[serde(default)]
        options: Gsm8kOptions,
        /// Use at most this many train problems (all when absent).
        #[serde(default)]
        train_limit: Option<usize>,
    },
}

/// The base policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// A tiny preset trained here, or a checkpoint.
    #[serde(deserialize_with = "deserialize_base")]
    pub base: PolicyBase,
    /// The prompt template (answer format) every method uses.
    pub template: Template,
    /// Render prompts with the checkpoint's chat template. Default false.
    #[serde(default)]
    pub chat_template: bool,
    /// LoRA adapters for every RL method (GRPO, PPO, RLOO cells; Minimal-GRPO uses rank 16,
    /// alpha 32): only the adapters train (PPO's new value head trains in full), the KL
    /// reference is the base without them, and each cell saves its adapters in PEFT's layout
    /// to `cells/<id>/adapter/`. A preset's supervised base trains in full: it starts from
    /// random weights, where a low-rank update of a frozen random model has nothing to adapt.
    #[serde(default)]
    pub lora: Option<LoraSettings>,
    /// Longest prompt + completion, in tokens. Default 256.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
}

fn default_max_length() -> usize {
    256
}

/// Where the base policy comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicyBase {
    /// Trained here: a BPE tokenizer and a tiny model, supervised on worked problems.
    Preset {
        /// Architecture and size.
        preset: Preset,
        /// Tokenizer vocabulary. Default 512.
        #[serde(default = "default_vocab")]
        vocab_size: usize,
        /// Supervised training of the base.
        #[serde(default)]
        sft: SftSpec,
    },
    /// A Hugging Face checkpoint: a local directory or a hub id `owner/name[@revision]`.
    Checkpoint {
        /// Directory or hub id.
        model: String,
    },
}

fn default_vocab() -> usize {
    512
}

/// Supervised training of a preset base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftSpec {
    /// Optimizer steps. Default 600.
    pub steps: u64,
    /// Examples per step. Default 16.
    pub batch_size: usize,
    /// Peak learning rate. Default 1e-3.
    pub learning_rate: f64,
    /// Train on only this share of the train split, leaving the rest unseen so that RL has
    /// headroom. Default 1.0.
    pub data_fraction: f64,
    /// 0 (default): one problem per sequence, the prompt masked (fine-tuning on completions).
    /// n > 0: documents of 1 to n worked problems back to back, every token trained (as in
    /// pretraining): each step sees several times more solved problems, and a few-shot prompt is
    /// a natural continuation of what the base has read.
    pub problems_per_document: usize,
    /// Share of the supervised solutions that end in the template's answer marker (`#### N`,
    /// plain template only); the others end in free text, `The answer is N.`, as solutions in
    /// pretraining data do. Default 1 (always the marker). Below 1/2 the greedy base writes the
    /// free-text ending: strict accuracy (the marker) then starts low while lenient accuracy (the
    /// last number) does not, which is the format gap few-shot exemplars and RL rewards close in
    /// the GPT-Neo GSM8K study.
    pub answer_marker_fraction: f64,
}

impl Default for SftSpec {
    fn default() -> Self {
        Self {
            steps: 600,
            batch_size: 16,
            learning_rate: 1e-3,
            data_fraction: 1.0,
            problems_per_document: 0,
            answer_marker_fraction: 1.0,
        }
    }
}

/// The reward model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardModelSpec {
    /// A tiny RoBERTa trained here on comparisons.
    Train {
        /// Width. Default 64.
        #[serde(default = "default_rm_width")]
        hidden_size: usize,
        /// Layers. Default 2.
        #[serde(default = "default_rm_layers")]
        num_layers: usize,
        /// Feed-forward width. Default twice `hidden_size`. Wider helps the wrong-answer check
        /// (`cargo xtask reward-model --intermediate-size 1024 --token-loss-weight 1 --steps 2000
        /// --batch-size 32`: 84% of wrong answers, 77% overall, in 6 minutes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        intermediate_size: Option<usize>,
        /// Training settings.
        #[serde(default)]
        training: reward_model::train::RewardTrainingConfig,
        /// Comparisons from the base policy's own samples besides the synthetic ones; absent:
        /// synthetic comparisons only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy_samples: Option<PolicySamples>,
    },
    /// A checkpoint (for example `distilbert/distilroberta-base`), fine-tuned on comparisons
    /// when `fine_tune` is set.
    Checkpoint {
        /// Directory or hub id.
        model: String,
        /// Fine-tuning settings; absent: use the checkpoint's head as is.
        #[serde(default)]
        fine_tune: Option<reward_model::train::RewardTrainingConfig>,
        /// Comparisons from the base policy's own samples besides the synthetic ones; absent:
        /// synthetic comparisons only. Needs `fine_tune`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy_samples: Option<PolicySamples>,
    },
    /// A causal LM with a scalar head on its last non-padding token (transformers'
    /// `LlamaForSequenceClassification` layout; `reward_model::CausalRewardModel`), trained
    /// here on comparisons; it reads text with its own (the policy family's) tokenizer.
    CausalLm {
        /// Starting model: directory, GGUF file or hub id (a `*ForSequenceClassification`
        /// checkpoint keeps its head; a causal-LM one gets a new head). Leave out with
        /// `from_base = true`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        /// Start from the study's trained base policy (InstructGPT's choice: the reward model
        /// begins from the supervised model). Default false.
        #[serde(default)]
        from_base: bool,
        /// LoRA on the trunk (the head trains in full); absent: every weight trains.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lora: Option<policy_models::LoraSettings>,
        /// Longest input in tokens (prompt and completion, kept from the end). Default 512.
        #[serde(default = "default_causal_rm_tokens")]
        max_tokens: usize,
        /// What the score reads: `last_token` (default), a linear head on the last token; or
        /// `likelihood`, `beta` times the mean log-probability of the completion under the model
        /// itself (`reward_model::LikelihoodRewardModel`), trained through its LM head.
        #[serde(default, skip_serializing_if = "CausalScore::is_last_token")]
        score: CausalScore,
        /// The scale of `score = "likelihood"`: the Bradley-Terry loss reads beta times the
        /// difference of mean log-probabilities. Default 10.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta: Option<f32>,
        /// Training settings (`learning_rate` around 1e-5 in full, 1e-4 with LoRA, for a
        /// pretrained model; `token_loss_weight` must stay 0).
        #[serde(default)]
        training: reward_model::train::RewardTrainingConfig,
        /// Comparisons from the base policy's own samples besides the synthetic ones; absent:
        /// synthetic comparisons only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy_samples: Option<PolicySamples>,
    },
}

impl RewardModelSpec {
    /// The policy-sample comparisons asked for, whichever kind of reward model.
    pub fn policy_samples(&self) -> Option<&PolicySamples> {
        match self {
            RewardModelSpec::Train { policy_samples, .. }
            | RewardModelSpec::Checkpoint { policy_samples, .. }
            | RewardModelSpec::CausalLm { policy_samples, .. } => policy_samples.as_ref(),
        }
    }
}

/// `[reward_model] policy_samples`: comparisons between the study's base policy's own answers,
/// labelled by the lenient rule checker (the last number against the gold answer), the kind of
/// text PPO asks the reward model to score. For each question, `samples` completions are drawn;
/// every correct x incorrect pair (up to `max_pairs_per_problem`) becomes a comparison, so a
/// question the base always or never gets right gives none. Training pairs come from the first
/// `problems` train questions, held-out pairs from the first `problems` test questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySamples {
    /// Questions sampled from each split.
    pub problems: usize,
    /// Completions per question (at least 2). Default 8.
    #[serde(default = "default_policy_samples")]
    pub samples: usize,
    /// Longest completion in tokens. Default 64.
    #[serde(default = "default_policy_sample_tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature. Default 1.0.
    #[serde(default = "default_policy_sample_temperature")]
    pub temperature: f32,
    /// Most comparisons from one question. Default 4.
    #[serde(default = "default_policy_sample_pairs")]
    pub max_pairs_per_problem: usize,
}

fn default_policy_samples() -> usize {
    8
}
fn default_policy_sample_tokens() -> usize {
    64
}
fn default_policy_sample_temperature() -> f32 {
    1.0
}
fn default_policy_sample_pairs() -> usize {
    4
}

/// `[reward_model] score` of a causal-LM reward model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CausalScore {
    /// A linear head on the last non-padding token (`LlamaForSequenceClassification`).
    #[default]
    LastToken,
    /// Beta times the completion's mean token log-probability (the model as its own verifier).
    Likelihood,
}

impl CausalScore {
    fn is_last_token(&self) -> bool {
        *self == CausalScore::LastToken
    }
}

/// The default beta of `score = "likelihood"` (the probe's, `research/smollm2_likelihood_verifier_probe.py`).
pub const DEFAULT_LIKELIHOOD_BETA: f32 = 10.0;

fn default_causal_rm_tokens() -> usize {
    512
}

fn default_rm_width() -> usize {
    64
}
fn default_rm_layers() -> usize {
    2
}

/// One reward function with its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightedReward {
    /// The rule.
    #[serde(flatten)]
    pub kind: RewardKind,
    /// Its weight in the total. Default 1. Weight 0 logs the function without training on it
    /// (true correctness beside a reward model's score, so reward hacking shows).
    #[serde(default = "one")]
    pub weight: f32,
}

fn one() -> f32 {
    1.0
}

/// A reward source: rule functions, the reward model, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSourceSpec {
    /// Rule-based functions.
    #[serde(default)]
    pub rules: Vec<WeightedReward>,
    /// Weight of the reward model's score (absent: not used).
    #[serde(default)]
    pub reward_model_weight: Option<f32>,
    /// Standardise the reward model's scores with running statistics. Default true.
    #[serde(default = "yes")]
    pub normalize_reward_model: bool,
}

fn yes() -> bool {
    true
}

/// A method of the comparison (read through [`tagged`], so errors name the field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MethodSpec {
    /// No training: k exemplars from train in every prompt.
    FewShot {
        /// Exemplars (0 allowed).
        k: usize,
    },
    /// The base itself (after its supervised training, for presets), zero-shot.
    Base {},
    /// An RL algorithm from the registry, trained with `steps` steps per cell.
    Rl {
        /// Registered name: grpo, ppo, rloo, ...
        algorithm: String,
        /// Reward sources (names of `[reward_sources.*]`); one cell per source.
        reward_sources: Vec<String>,
        /// Training steps.
        steps: u64,
        /// Prompts per step.
        #[serde(default = "default_prompts_per_step")]
        prompts_per_step: usize,
        /// Exemplars in the training and evaluation prompts ("GRPO combined with CoT prompting").
        #[serde(default)]
        few_shot_k: usize,
        /// Optimisation settings. The runner sets `total_steps` to the run's optimizer steps
        /// (see [`Study::rl_optim`]), so a value given here has no effect.
        #[serde(default)]
        optim: OptimSettings,
        /// The algorithm's own settings (checked by its registry entry).
        #[serde(default = "empty_table")]
        config: serde_json::Value,
    },
}

fn default_prompts_per_step() -> usize {
    4
}

/// `toml`'s error `message\nin `a.b`` as `prefix.a.b: message`.
fn keyed(prefix: &str, error: &toml::de::Error) -> String {
    let text = error.to_string();
    let text = text.trim_end();
    match text.rsplit_once("\nin `") {
        Some((message, keys)) if keys.ends_with('`') => format!("{prefix}.{}: {message}", &keys[..keys.len() - 1]),
        _ => format!("{prefix}: {text}"),
    }
}

/// Reads a `kind`-tagged table (a method, the task, the base, the reward model) as `T`, with
/// errors that name the field: `prefix.field: message`. serde's internally tagged enums buffer
/// the table before choosing the variant, so their own errors name only the table. The field is
/// found by taking values out one at a time, deepest first: the first whose removal changes the
/// error (to success, or to "missing field") is the one it was about. A type error is raised when
/// its value is visited, before any check of missing fields, so no other removal changes it. An
/// unknown `kind` is named as such.
pub fn tagged<T: serde::de::DeserializeOwned>(prefix: &str, table: toml::Table) -> Result<T, String> {
    let attempt = |table: &toml::Table| {
        toml::Value::Table(table.clone()).try_into::<T>().map_err(|error: toml::de::Error| error.to_string())
    };
    let error = match attempt(&table) {
        Ok(value) => return Ok(value),
        Err(error) => error,
    };
    if error.trim_end().contains("\nin `") {
        // toml named the key itself (outside the buffered part).
        return Err(keyed(prefix, &toml::Value::Table(table).try_into::<T>().err().expect("failed above")));
    }
    let message = error.trim_end();
    if let Some(toml::Value::String(kind)) = table.get("kind")
        && message.starts_with(&format!("unknown variant `{kind}`"))
    {
        return Err(format!("{prefix}.kind: {message}"));
    }
    if message.starts_with("missing field") {
        // It names the field; taking out another required one would only change which is missing.
        return Err(format!("{prefix}: {message}"));
    }
    // Not the tag itself: without it, every table fails with "missing field `kind`".
    for path in value_paths(&table).into_iter().filter(|path| path != &["kind"]) {
        let mut without = table.clone();
        remove_path(&mut without, &path);
        if attempt(&without).err().as_deref() != Some(error.as_str()) {
            return Err(format!("{prefix}.{}: {message}", path.join(".")));
        }
    }
    Err(format!("{prefix}: {message}"))
}

/// Every key path of `table`, nested tables' keys before their parent's (deepest first).
fn value_paths(table: &toml::Table) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for (key, value) in table {
        if let toml::Value::Table(inner) = value {
            paths.extend(value_paths(inner).into_iter().map(|mut path| {
                path.insert(0, key.clone());
                path
            }));
        }
        paths.push(vec![key.clone()]);
    }
    paths
}

fn remove_path(table: &mut toml::Table, path: &[String]) {
    match path {
        [] => {}
        [last] => {
            table.remove(last);
        }
        [first, rest @ ..] => {
            if let Some(toml::Value::Table(inner)) = table.get_mut(first) {
                remove_path(inner, rest);
            }
        }
    }
}

fn deserialize_task<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<TaskSpec, D::Error> {
    tagged("task", toml::Table::deserialize(deserializer)?).map_err(serde::de::Error::custom)
}

fn deserialize_base<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<PolicyBase, D::Error> {
    tagged("policy.base", toml::Table::deserialize(deserializer)?).map_err(serde::de::Error::custom)
}

fn deserialize_reward_model<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<RewardModelSpec>, D::Error> {
    Option::<toml::Table>::deserialize(deserializer)?
        .map(|table| tagged("reward_model", table))
        .transpose()
        .map_err(serde::de::Error::custom)
}

fn deserialize_methods<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, MethodSpec>, D::Error> {
    let tables = BTreeMap::<String, toml::Table>::deserialize(deserializer)?;
    tables
        .into_iter()
        .map(|(name, table)| tagged(&format!("methods.{name}"), table).map(|method| (name, method)))
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

fn empty_table() -> serde_json::Value {
    serde_json::json!({})
}

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationSpec {
    /// Held-out problems evaluated (from the start of the test split). Default 200.
    pub test_size: usize,
    /// Tokens generated per answer. Default 96.
    pub max_new_tokens: usize,
    /// Prompts per generation batch. Default 32.
    pub batch_size: usize,
    /// Samples per problem for maj@k (0: greedy only). Default 0.
    pub maj_k: usize,
    /// Sampling temperature of the maj@k samples. Default 0.7.
    pub maj_temperature: f32,
    /// Held-out evaluations during training, every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Problems of those evaluations during training (the first of the test split). Default 64.
    pub train_eval_size: usize,
    /// Test questions whose completions are saved before and after training. Default 8.
    pub samples: usize,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        Self {
            test_size: 200,
            max_new_tokens: 96,
            batch_size: 32,
            maj_k: 0,
            maj_temperature: 0.7,
            eval_every: 0,
            train_eval_size: 64,
            samples: 8,
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// Method name.
    pub method: String,
    /// Reward source name (`-` for methods without one).
    pub reward_source: String,
    /// Seed.
    pub seed: u64,
}

impl Cell {
    /// A file-system-safe identifier.
    pub fn id(&self) -> String {
        format!("{}__{}__seed{}", self.method, self.reward_source, self.seed)
    }
}

impl Study {
    /// Reads and validates a study file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read the study file {}", path.display()))?;
        let study: Study = toml::from_str(&text).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
        study.validate(registry()).with_context(|| format!("{}: invalid study", path.display()))?;
        Ok(study)
    }

    /// Checks the study against itself and the algorithm registry.
    pub fn validate(&self, registry: &[rl_algos::AlgorithmEntry]) -> anyhow::Result<()> {
        // Names become directories and file names under reports/<name>/ (cells/<method>__<source>__seed<n>),
        // so each must be one plain path component.
        check_name("name", &self.name)?;
        for name in self.methods.keys() {
            check_name(&format!("[methods.{name:?}]"), name)?;
        }
        for name in self.reward_sources.keys() {
            check_name(&format!("[reward_sources.{name:?}]"), name)?;
        }
        if self.seeds.is_empty() {
            bail!("seeds is empty; name at least one seed");
        }
        // A repeated seed is a repeated cell: it would count twice in the means and intervals.
        let mut seen = std::collections::BTreeSet::new();
        if let Some(seed) = self.seeds.iter().find(|seed| !seen.insert(**seed)) {
            bail!(
                "seeds lists {seed} twice; each seed must appear once (a repeat would count twice in the means and intervals)"
            );
        }
        if self.methods.is_empty() {
            bail!("no [methods.*]; name at least one method");
        }
        // A mistyped checkpoint path is refused here, before any training, rather than read as
        // a hub id (the reference is read from the working directory, as the runner reads it).
        if let PolicyBase::Checkpoint { model } = &self.policy.base {
            policy_models::ModelSource::parse(model).map_err(|error| anyhow::anyhow!("policy.base.model: {error}"))?;
        }
        if let Some(RewardModelSpec::Checkpoint { model, .. }) = &self.reward_model {
            policy_models::ModelSource::parse(model).map_err(|error| anyhow::anyhow!("reward_model.model: {error}"))?;
        }
        if let Some(RewardModelSpec::CausalLm { model, from_base, lora, max_tokens, training, score, beta, .. }) =
            &self.reward_model
        {
            match (score, beta) {
                (CausalScore::LastToken, Some(_)) => {
                    bail!("reward_model.beta is the scale of score = \"likelihood\"; remove it or set that score")
                }
                (CausalScore::Likelihood, Some(beta)) if !(beta.is_finite() && *beta > 0.0) => {
                    bail!("reward_model.beta = {beta}; it must be positive, e.g. {DEFAULT_LIKELIHOOD_BETA}")
                }
                _ => {}
            }
            match (model, from_base) {
                (Some(_), true) => {
                    bail!("reward_model: both model and from_base = true; keep one (the starting model)")
                }
                (None, false) => {
                    bail!("reward_model: kind = \"causal_lm\" needs model = \"<dir|gguf|hub id>\" or from_base = true")
                }
                (Some(model), false) => drop(
                    policy_models::ModelSource::parse(model)
                        .map_err(|error| anyhow::anyhow!("reward_model.model: {error}"))?,
                ),
                (None, true) => {}
            }
            if let Some(lora) = lora {
                lora.validate().map_err(|error| anyhow::anyhow!("reward_model.lora.{error}"))?;
            }
            if *max_tokens < 3 {
                bail!(
                    "reward_model.max_tokens = {max_tokens}; use at least 3 (first token, text, last token), e.g. 512"
                );
            }
            if training.token_loss_weight != 0.0 {
                bail!(
                    "reward_model.training.token_loss_weight = {}: the causal-LM reward model has no token head; set it to 0",
                    training.token_loss_weight
                );
            }
        }
        if self.policy.max_length == 0 {
            bail!("policy.max_length = 0; use at least 1 (the longest prompt + completion, in tokens)");
        }
        if let TaskSpec::Synthetic { synthetic } = &self.task {
            synthetic.validate()?;
        }
        if let TaskSpec::Gsm8k { source: source @ (Gsm8kSource::Path(_) | Gsm8kSource::Files { .. }), .. } = &self.task
        {
            // The loader refuses these too; checking here makes --dry-run say so.
            let one_file = match source {
                Gsm8kSource::Path(path) => path.is_file().then_some(path),
                Gsm8kSource::Files { train, test } => (train == test).then_some(train),
                Gsm8kSource::Hub { .. } => None,
            };
            if let Some(path) = one_file {
                bail!("task.source: {}", tasks::TaskError::OneFileForBothSplits { path: path.clone() });
            }
        }
        if let Some(lora) = &self.policy.lora {
            lora.validate().map_err(|error| anyhow::anyhow!("policy.lora.{error}"))?;
        }
        if let PolicyBase::Preset { sft, vocab_size, .. } = &self.policy.base {
            let minimum = policy_models::presets::MIN_TRAINED_VOCAB;
            if *vocab_size < minimum {
                bail!(
                    "policy.base.vocab_size = {vocab_size}: use at least {minimum} (the 256-byte alphabet and the 2 special tokens)"
                );
            }
            if sft.steps == 0 {
                bail!("policy.base.sft.steps = 0; train the base for at least one step");
            }
            if sft.batch_size == 0 {
                bail!("policy.base.sft.batch_size = 0; use at least 1");
            }
            if !(sft.learning_rate.is_finite() && sft.learning_rate > 0.0) {
                bail!("policy.base.sft.learning_rate = {} must be a finite number above 0", sft.learning_rate);
            }
            if !(sft.data_fraction > 0.0 && sft.data_fraction <= 1.0) {
                bail!("policy.base.sft.data_fraction = {} must be within (0, 1]", sft.data_fraction);
            }
            if !(0.0..=1.0).contains(&sft.answer_marker_fraction) {
                bail!("policy.base.sft.answer_marker_fraction = {} must be within [0, 1]", sft.answer_marker_fraction);
            }
            if sft.answer_marker_fraction < 1.0 && self.policy.template != Template::Plain {
                bail!(
                    "policy.base.sft.answer_marker_fraction = {} needs template = \"plain\" (the `#### N` marker); remove it or use the plain template",
                    sft.answer_marker_fraction
                );
            }
        }
        let evaluation = &self.evaluation;
        for (field, value) in [
            ("test_size", evaluation.test_size),
            ("batch_size", evaluation.batch_size),
            ("max_new_tokens", evaluation.max_new_tokens),
        ] {
            if value == 0 {
                bail!("evaluation.{field} = 0; use at least 1");
            }
        }
        if evaluation.maj_k == 1 {
            bail!("evaluation.maj_k = 1 is one sample, not a vote; use 0 (greedy only) or at least 3");
        }
        if evaluation.maj_k > 0 && !(evaluation.maj_temperature > 0.0) {
            bail!("evaluation.maj_temperature = {} must be above 0 when maj_k > 0", evaluation.maj_temperature);
        }
        if evaluation.eval_every > 0 && evaluation.train_eval_size == 0 {
            bail!(
                "evaluation.train_eval_size = 0 with eval_every = {}; evaluate at least one problem",
                evaluation.eval_every
            );
        }
        if let Some(RewardModelSpec::Train { hidden_size, num_layers, intermediate_size, .. }) = &self.reward_model {
            let heads = reward_model::RobertaConfig::TINY_HEADS;
            if *hidden_size == 0 || hidden_size % heads != 0 {
                bail!(
                    "reward_model.hidden_size = {hidden_size}: use a positive multiple of {heads} (the tiny model's attention heads)"
                );
            }
            if *num_layers == 0 {
                bail!("reward_model.num_layers = 0; use at least 1");
            }
            if *intermediate_size == Some(0) {
                bail!("reward_model.intermediate_size = 0; use at least 1, or leave it out for twice hidden_size");
            }
        }
        if let Some(spec) = &self.reward_model
            && let Some(samples) = spec.policy_samples()
        {
            if matches!(spec, RewardModelSpec::Checkpoint { fine_tune: None, .. }) {
                bail!(
                    "reward_model.policy_samples: the checkpoint is used as is (no fine_tune), so nothing trains on them; add fine_tune = {{ ... }} or remove policy_samples"
                );
            }
            if samples.problems == 0 {
                bail!("reward_model.policy_samples.problems = 0; use at least 1, or remove policy_samples");
            }
            if samples.samples < 2 {
                bail!(
                    "reward_model.policy_samples.samples = {}: a pair needs a correct and an incorrect sample; use at least 2, e.g. 8",
                    samples.samples
                );
            }
            if samples.max_new_tokens == 0 {
                bail!("reward_model.policy_samples.max_new_tokens = 0; use at least 1, e.g. 64");
            }
            if !(samples.temperature.is_finite() && samples.temperature > 0.0) {
                bail!(
                    "reward_model.policy_samples.temperature = {} must be a finite number above 0, e.g. 1.0",
                    samples.temperature
                );
            }
            if samples.max_pairs_per_problem == 0 {
                bail!("reward_model.policy_samples.max_pairs_per_problem = 0; use at least 1, e.g. 4");
            }
        }
        let reward_training = match &self.reward_model {
            Some(RewardModelSpec::Train { training, .. } | RewardModelSpec::CausalLm { training, .. }) => {
                Some(("reward_model.training", training))
            }
            Some(RewardModelSpec::Checkpoint { fine_tune: Some(training), .. }) => {
                Some(("reward_model.fine_tune", training))
            }
            _ => None,
        };
        if let Some((field, training)) = reward_training {
            if training.batch_size == 0 {
                bail!("{field}.batch_size = 0; use at least 1");
            }
            if !(training.learning_rate.is_finite() && training.learning_rate > 0.0) {
                bail!("{field}.learning_rate = {} must be a finite number above 0", training.learning_rate);
            }
        }
        for (name, source) in &self.reward_sources {
            if source.rules.is_empty() && source.reward_model_weight.is_none() {
                bail!("reward_sources.{name}: no rules and no reward_model_weight; it rewards nothing");
            }
            if source.reward_model_weight.is_some() && self.reward_model.is_none() {
                bail!("reward_sources.{name} uses the reward model but there is no [reward_model] section");
            }
            for (index, rule) in source.rules.iter().enumerate() {
                rule.kind
                    .validate()
                    .map_err(|error| anyhow::anyhow!("reward_sources.{name}.rules[{index}]: {error}"))?;
            }
        }
        for (name, method) in &self.methods {
            if let MethodSpec::Rl { algorithm, reward_sources, steps, prompts_per_step, config, optim, .. } = method {
                let entry = registry.iter().find(|entry| entry.name == algorithm).ok_or_else(|| {
                    let known: Vec<&str> = registry.iter().map(|entry| entry.name).collect();
                    anyhow::anyhow!(
                        "methods.{name}.algorithm = {algorithm:?} is not registered; known: {}",
                        known.join(", ")
                    )
                })?;
                (entry.validate)(config).map_err(|error| anyhow::anyhow!("methods.{name}.config: {error}"))?;
                optim.validate().map_err(|error| anyhow::anyhow!("methods.{name}.optim: {error}"))?;
                if *steps == 0 {
                    bail!("methods.{name}.steps = 0; train for at least one step");
                }
                if *prompts_per_step == 0 {
                    bail!("methods.{name}.prompts_per_step = 0; use at least 1");
                }
                if reward_sources.is_empty() {
                    bail!("methods.{name}.reward_sources is empty; name at least one of [reward_sources.*]");
                }
                for source in reward_sources {
                    if !self.reward_sources.contains_key(source) {
                        bail!(
                            "methods.{name}.reward_sources names {source:?}, which is not a [reward_sources.*] section"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Every cell, methods in name order, then reward sources, then seeds.
    pub fn matrix(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for (name, method) in &self.methods {
            let sources: Vec<String> = match method {
                MethodSpec::Rl { reward_sources, .. } => reward_sources.clone(),
                MethodSpec::FewShot { .. } | MethodSpec::Base {} => vec!["-".to_string()],
            };
            for source in sources {
                for &seed in &self.seeds {
                    cells.push(Cell { method: name.clone(), reward_source: source.clone(), seed });
                }
            }
        }
        cells
    }
}

impl Study {
    /// The `quick` preset: the same pipeline with small sizes, one seed and a few steps, for a
    /// smoke run in minutes.
    pub fn apply_quick_preset(&mut self) {
        self.name = format!("{}-quick", self.name);
        self.seeds.truncate(1);
        if let TaskSpec::Synthetic { synthetic } = &mut self.task {
            synthetic.train_size = synthetic.train_size.min(300);
            synthetic.test_size = synthetic.test_size.min(40);
        }
        if let PolicyBase::Preset { sft, .. } = &mut self.policy.base {
            sft.steps = sft.steps.min(30);
        }
        if let Some(RewardModelSpec::Train { training, .. } | RewardModelSpec::CausalLm { training, .. }) =
            &mut self.reward_model
        {
            training.steps = training.steps.min(20);
        }
        if let Some(
            RewardModelSpec::Train { policy_samples: Some(samples), .. }
            | RewardModelSpec::Checkpoint { policy_samples: Some(samples), .. }
            | RewardModelSpec::CausalLm { policy_samples: Some(samples), .. },
        ) = &mut self.reward_model
        {
            samples.problems = samples.problems.min(8);
            samples.samples = samples.samples.min(4);
            samples.max_new_tokens = samples.max_new_tokens.min(24);
        }
        for method in self.methods.values_mut() {
            if let MethodSpec::Rl { steps, prompts_per_step, .. } = method {
                *steps = (*steps).min(3);
                *prompts_per_step = (*prompts_per_step).min(2);
            }
        }
        self.evaluation.test_size = self.evaluation.test_size.min(16);
        self.evaluation.max_new_tokens = self.evaluation.max_new_tokens.min(24);
        self.evaluation.samples = self.evaluation.samples.min(4);
        if self.evaluation.eval_every > 0 {
            self.evaluation.eval_every = 2;
            self.evaluation.train_eval_size = self.evaluation.train_eval_size.min(8);
        }
    }
}

impl Study {
    /// The optimisation settings the RL method `method` is built with: its `optim`, with the
    /// learning-rate schedule spanning the run's optimizer steps (the method's steps x the
    /// optimizer steps its algorithm takes per step, as its registry entry counts them).
    pub fn rl_optim(&self, method: &str, registry: &[rl_algos::AlgorithmEntry]) -> anyhow::Result<OptimSettings> {
        let Some(MethodSpec::Rl { algorithm, steps, prompts_per_step, optim, config, .. }) = self.methods.get(method)
        else {
            bail!("methods.{method} is not an RL method");
        };
        let entry = registry
            .iter()
            .find(|entry| entry.name == algorithm)
            .with_context(|| format!("methods.{method}.algorithm = {algorithm:?} is not registered"))?;
        entry
            .run_optim(config, optim, *steps, *prompts_per_step)
            .map_err(|error| anyhow::anyhow!("methods.{method}.config: {error}"))
    }
}

/// Upper bounds on the tokens a cell generates and trains on (completions at their maximum
/// length), for `--dry-run`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CellCost {
    /// Tokens sampled: rollouts, evaluations during training and the final evaluation.
    pub generated_tokens: u64,
    /// Completion tokens passed through forward and backward.
    pub trained_tokens: u64,
}

impl std::ops::Add for CellCost {
    type Output = CellCost;
    fn add(self, other: CellCost) -> CellCost {
        CellCost {
            generated_tokens: self.generated_tokens + other.generated_tokens,
            trained_tokens: self.trained_tokens + other.trained_tokens,
        }
    }
}

/// Throughput of the tiny preset on the flex CPU backend on a 2-core machine, the basis of the
/// time estimate, in tokens per second: below what the default study achieves (its supervised
/// base trains ~4,200 tokens/s; its RL cells, rollouts and updates together, took 315 s for an
/// upper bound of ~1.0M generated + 0.77M trained tokens), so the estimate stays an upper bound.
const CPU_GENERATED_PER_SECOND: f64 = 3000.0;
const CPU_TRAINED_PER_SECOND: f64 = 4000.0;

impl Study {
    /// The hub references of the study not pinned to a commit (a branch or tag such as `main`
    /// moves: a rerun may read other files). provenance.json records what each resolved to.
    pub fn unpinned_hub_references(&self) -> Vec<String> {
        let is_commit = |revision: &str| revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
        let mut unpinned = Vec::new();
        let mut model = |field: &str, reference: &str| {
            if let Ok(policy_models::ModelSource::Hub { repo, revision }) = policy_models::ModelSource::parse(reference)
                && !is_commit(&revision)
            {
                unpinned.push(format!("{field} = \"{repo}@{revision}\""));
            }
        };
        if let PolicyBase::Checkpoint { model: reference } = &self.policy.base {
            model("policy.base.model", reference);
        }
        if let Some(
            RewardModelSpec::Checkpoint { model: reference, .. }
            | RewardModelSpec::CausalLm { model: Some(reference), .. },
        ) = &self.reward_model
        {
            model("reward_model.model", reference);
        }
        if let TaskSpec::Gsm8k { source: tasks::gsm8k::Gsm8kSource::Hub { repo, revision }, .. } = &self.task
            && !is_commit(revision)
        {
            unpinned.push(format!("task.source = {repo}@{revision}"));
        }
        unpinned
    }

    /// What `cell` costs at most, from its algorithm's rollout shape.
    pub fn cell_cost(&self, cell: &Cell) -> anyhow::Result<CellCost> {
        let evaluation = &self.evaluation;
        let final_eval =
            (evaluation.test_size as u64) * (evaluation.max_new_tokens as u64) * (1 + evaluation.maj_k as u64);
        Ok(match &self.methods[&cell.method] {
            MethodSpec::FewShot { .. } | MethodSpec::Base {} => {
                CellCost { generated_tokens: final_eval, trained_tokens: 0 }
            }
            MethodSpec::Rl { algorithm, steps, prompts_per_step, config, .. } => {
                let entry = registry()
                    .iter()
                    .find(|entry| entry.name == algorithm)
                    .with_context(|| format!("methods.{}: algorithm {algorithm:?} is not registered", cell.method))?;
                let shape = (entry.rollout_shape)(config)
                    .map_err(|error| anyhow::anyhow!("methods.{}.config: {error}", cell.method))?;
                // Every sampling round draws every group (an upper bound: resampling redraws only
                // the groups without variance); only the last round's completions are trained on.
                let kept = steps
                    * (*prompts_per_step as u64)
                    * (shape.completions_per_prompt as u64)
                    * (shape.max_completion_length as u64);
                let sampled = kept * shape.max_sampling_rounds as u64;
                let evals = if evaluation.eval_every > 0 {
                    steps.div_ceil(evaluation.eval_every)
                        * (evaluation.train_eval_size as u64)
                        * (evaluation.max_new_tokens as u64)
                } else {
                    0
                };
                CellCost {
                    generated_tokens: sampled + evals + final_eval,
                    trained_tokens: kept * shape.training_passes as u64,
                }
            }
        })
    }

    /// Tokens the base policy's and the tiny reward model's training pass through.
    pub fn preparation_tokens(&self) -> u64 {
        let base = match &self.policy.base {
            PolicyBase::Preset { sft, .. } => sft.steps * (sft.batch_size as u64) * (self.policy.max_length as u64 / 2),
            PolicyBase::Checkpoint { .. } => 0,
        };
        let reward_model = match &self.reward_model {
            Some(RewardModelSpec::Train { training, .. })
            | Some(RewardModelSpec::Checkpoint { fine_tune: Some(training), .. }) => {
                training.steps * (training.batch_size as u64) * 2 * 64
            }
            Some(RewardModelSpec::CausalLm { training, max_tokens, .. }) => {
                training.steps * (training.batch_size as u64) * 2 * (*max_tokens as u64).min(192)
            }
            _ => 0,
        };
        base + reward_model
    }

    /// Tokens the reward model's policy samples draw from the base before any cell runs: each
    /// split's questions x samples x longest completion (an upper bound; a split with fewer
    /// questions draws fewer).
    pub fn preparation_generated_tokens(&self) -> u64 {
        self.reward_model
            .as_ref()
            .and_then(RewardModelSpec::policy_samples)
            .map_or(0, |samples| 2 * samples.problems as u64 * samples.samples as u64 * samples.max_new_tokens as u64)
    }

    /// A rough wall-clock estimate on the CPU backend; other backends are not estimated.
    pub fn time_estimate(&self, cells: CellCost) -> String {
        if self.backend != BackendKind::Flex {
            return format!(
                "time: not estimated for the {} backend (the estimate is calibrated on the flex CPU backend)",
                self.backend
            );
        }
        let preset = matches!(self.policy.base, PolicyBase::Preset { .. });
        let seconds = (cells.generated_tokens + self.preparation_generated_tokens()) as f64 / CPU_GENERATED_PER_SECOND
            + (cells.trained_tokens + self.preparation_tokens()) as f64 / CPU_TRAINED_PER_SECOND;
        if preset {
            format!(
                "time: at most ~{:.0} minutes on 2 CPU cores (tiny preset; completions that stop early take less)",
                seconds / 60.0
            )
        } else {
            format!(
                "time: ~{:.0} minutes at tiny-preset CPU speed; a real checkpoint is orders of magnitude slower on the CPU: use a GPU backend",
                seconds / 60.0
            )
        }
    }
}

/// Checks that `value`, the study's `field`, can be one path component under reports/: letters,
/// digits, `.`, `_` and `-`, not empty and not starting with a dot (no `..`, no hidden files, no
/// separators, no absolute paths).
fn check_name(field: &str, value: &str) -> anyhow::Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if value.is_empty() || value.starts_with('.') || !value.chars().all(allowed) {
        bail!(
            "{field} = {value:?} is not a usable name: it names files under reports/, so use only letters, digits, '.', '_' and '-', not empty and not starting with '.'"
        );
    }
    Ok(())
}

/// The algorithms the study runner knows: rl-algos' own and those of algorithm crates.
pub fn registry() -> &'static [rl_algos::AlgorithmEntry] {
    static REGISTRY: std::sync::LazyLock<Vec<rl_algos::AlgorithmEntry>> = std::sync::LazyLock::new(|| {
        let mut entries = rl_algos::BUILTIN.to_vec();
        // Algorithm crates: one line each.
        entries.push(algo_rloo::ENTRY);
        entries
    });
    &REGISTRY
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs_dir() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
    }

    #[test]
    fn every_committed_study_parses_validates_and_resolves_its_matrix() {
        let expected = [
            ("default.toml", 6 * 3),
            ("smollm2-reward-model.toml", 5),
            ("gsm8k-gpt-neo-125m.toml", 6 * 3),
            ("gsm8k-gpt-neo-1.3b.toml", 6 * 3),
            ("gsm8k-qwen2.5-1.5b-instruct.toml", 2),
            ("synthetic-qwen2.5-0.5b-instruct.toml", 2),
            ("gsm8k-llama-3.2-1b-instruct.toml", 3 * 2),
        ];
        for (file, cells) in expected {
            let study = Study::load(&configs_dir().join(file)).unwrap_or_else(|error| panic!("{file}: {error:#}"));
            let matrix = study.matrix();
            assert_eq!(matrix.len(), cells, "{file}: {matrix:?}");
            let ids: std::collections::HashSet<_> = matrix.iter().map(Cell::id).collect();
            assert_eq!(ids.len(), matrix.len(), "{file}: cell ids are unique");
        }
    }

    #[test]
    fn the_default_study_is_cpu_only_and_offline() {
        let study = Study::load(&configs_dir().join("default.toml")).unwrap();
        assert_eq!(study.backend, BackendKind::Flex);
        assert!(matches!(study.task, TaskSpec::Synthetic { .. }));
        assert!(matches!(study.policy.base, PolicyBase::Preset { .. }));
        // Trained from scratch on this task, a reward model does not check answers (the file
        // says what was measured), so PPO takes the rule reward.
        assert!(study.reward_model.is_none());
        assert!(study.reward_sources.values().all(|source| source.reward_model_weight.is_none()));
    }

    fn parse(text: &str) -> anyhow::Result<Study> {
        let study: Study = toml::from_str(text).map_err(|error| anyhow::anyhow!("{error}"))?;
        study.validate(registry())?;
        Ok(study)
    }

    const MINIMAL: &str = r#"
name = "t"
[task]
kind = "synthetic"
[policy]
template = "plain"
[policy.base]
kind = "preset"
preset = "tiny_gpt_neo"
[reward_sources.rules]
rules = [{ kind = "strict_correct", format = "gsm8k_marker" }]
[methods.grpo]
kind = "rl"
algorithm = "grpo"
reward_sources = ["rules"]
steps = 2
"#;

    /// The runner's schedules span each method's optimizer steps: PPO takes epochs x
    /// minibatches per step, GRPO one per iteration, so a total of `steps` would end the
    /// schedule (at a rate of 0 with `min_lr_ratio = 0`) partway through the run.
    #[test]
    fn schedules_span_the_optimizer_steps_of_each_rl_method() {
        let text = format!(
            "{MINIMAL}config = {{ num_iterations = 2 }}\n\
             [methods.ppo]\nkind = \"rl\"\nalgorithm = \"ppo\"\nreward_sources = [\"rules\"]\nsteps = 10\nprompts_per_step = 4\n\
             optim = {{ min_lr_ratio = 0.0, warmup_ratio = 0.1, total_steps = 10 }}\nconfig = {{ num_ppo_epochs = 4, num_mini_batches = 2 }}\n"
        );
        let study = parse(&text).unwrap();
        let ppo = study.rl_optim("ppo", registry()).unwrap();
        assert_eq!(ppo.total_steps, 10 * 4 * 2);
        assert_eq!(ppo.schedule().warmup_steps, 8, "the warmup ratio applies to optimizer steps");
        assert!(ppo.schedule().learning_rate_at(ppo.total_steps - 1) > 0.0);
        assert_eq!(study.rl_optim("grpo", registry()).unwrap().total_steps, 2 * 2);
        assert!(study.rl_optim("nope", registry()).is_err());
        // The committed GPT-Neo studies: PPO's default epochs over one minibatch per step; the
        // rate is still above 0 at the last of them.
        let epochs = rl_algos::ppo::PpoConfig::default().num_ppo_epochs as u64;
        for file in ["gsm8k-gpt-neo-125m.toml", "gsm8k-gpt-neo-1.3b.toml"] {
            let study = Study::load(&configs_dir().join(file)).unwrap();
            let Some(MethodSpec::Rl { steps, .. }) = study.methods.get("ppo") else { panic!("{file}: no ppo method") };
            let optim = study.rl_optim("ppo", registry()).unwrap();
            assert_eq!(optim.total_steps, steps * epochs, "{file}");
            assert!(optim.schedule().learning_rate_at(optim.total_steps - 1) > 0.0, "{file}");
        }
    }

    /// The dry run's token counts come from each algorithm's own rollout shape, defaults
    /// included: RLOO's 4 completions per prompt when its block names none (a guess from the
    /// JSON fell back to 1), GRPO's resampling rounds and iterations, PPO's one completion and
    /// its epochs.
    #[test]
    fn dry_run_costs_follow_each_algorithms_rollout_shape() {
        let text = format!(
            "{MINIMAL}prompts_per_step = 3\nconfig = {{ num_generations = 4, max_completion_length = 16, num_iterations = 2, zero_std_groups = \"resample\", max_resample_tries = 2 }}\n\
             [methods.rloo]\nkind = \"rl\"\nalgorithm = \"rloo\"\nreward_sources = [\"rules\"]\nsteps = 5\nprompts_per_step = 2\nconfig = {{ max_completion_length = 10 }}\n\
             [methods.ppo]\nkind = \"rl\"\nalgorithm = \"ppo\"\nreward_sources = [\"rules\"]\nsteps = 1\nprompts_per_step = 8\nconfig = {{ max_completion_length = 32, num_ppo_epochs = 3 }}\n\
             [evaluation]\ntest_size = 1\nmax_new_tokens = 1\neval_every = 0\n"
        );
        let study = parse(&text).unwrap();
        let cost = |method: &str| {
            study.cell_cost(&Cell { method: method.to_string(), reward_source: "rules".to_string(), seed: 0 }).unwrap()
        };
        // GRPO: 2 steps x 3 prompts x 4 completions x 16 tokens, sampled up to 1 + 2 rounds,
        // trained twice; the final evaluation adds one token (1 problem x 1 new token).
        assert_eq!(
            cost("grpo"),
            CellCost { generated_tokens: 2 * 3 * 4 * 16 * 3 + 1, trained_tokens: 2 * 3 * 4 * 16 * 2 }
        );
        let rloo_generations = algo_rloo::RlooConfig::default().num_generations as u64;
        assert_eq!(rloo_generations, 4);
        assert_eq!(
            cost("rloo"),
            CellCost {
                generated_tokens: 5 * 2 * rloo_generations * 10 + 1,
                trained_tokens: 5 * 2 * rloo_generations * 10
            }
        );
        assert_eq!(cost("ppo"), CellCost { generated_tokens: 8 * 32 + 1, trained_tokens: 8 * 32 * 3 });
    }

    /// The reward model's policy samples are counted before the cells: 64 questions of each
    /// split x 8 samples x 48 tokens in the SmolLM2 reward-model study, none without them.
    #[test]
    fn dry_run_counts_the_reward_models_policy_samples() {
        let study = Study::load(&configs_dir().join("smollm2-reward-model.toml")).unwrap();
        assert_eq!(study.preparation_generated_tokens(), 2 * 64 * 8 * 48);
        let without = Study { reward_model: None, ..study.clone() };
        assert_eq!(without.preparation_generated_tokens(), 0);
        let cells = CellCost::default();
        assert_ne!(study.time_estimate(cells), without.time_estimate(cells));
    }

    /// Every committed study is pinned except the two whose commits could not be confirmed
    /// offline; an unpinned reference is named, a commit is not.
    #[test]
    fn committed_hub_studies_pin_their_revisions() {
        for entry in std::fs::read_dir(configs_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let study = Study::load(&path).unwrap();
            let unpinned = study.unpinned_hub_references();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("gsm8k-gpt-neo") {
                assert_eq!(unpinned.len(), 2, "{name}: {unpinned:?}");
                assert!(
                    unpinned.iter().all(|r| r.ends_with("@main\""))
                        && unpinned[0].starts_with("policy.base.model = \"EleutherAI/"),
                    "{name}: {unpinned:?}"
                );
            } else {
                assert!(unpinned.is_empty(), "{name}: {unpinned:?}");
            }
        }
        let study = parse(&MINIMAL.replace("kind = \"synthetic\"", "kind = \"gsm8k\"")).unwrap();
        assert_eq!(study.unpinned_hub_references(), ["task.source = openai/gsm8k@main"]);
    }

    #[test]
    fn mistakes_are_errors_that_name_the_field() {
        parse(MINIMAL).unwrap();
        let unknown = format!("{MINIMAL}\n[evaluation]\ntest_sizes = 3\n");
        assert!(parse(&unknown).unwrap_err().to_string().contains("test_sizes"));
        let bad_algorithm = MINIMAL.replace("algorithm = \"grpo\"", "algorithm = \"dpo\"");
        let error = parse(&bad_algorithm).unwrap_err().to_string();
        assert!(error.contains("dpo") && error.contains("grpo"), "{error}");
        let bad_source = MINIMAL.replace("reward_sources = [\"rules\"]", "reward_sources = [\"rm\"]");
        assert!(parse(&bad_source).unwrap_err().to_string().contains("\"rm\""));
        let bad_config = format!("{MINIMAL}config = {{ num_generations = 1 }}\n");
        assert!(parse(&bad_config).unwrap_err().to_string().contains("num_generations = 1"));
        let lora = |fields: &str| {
            MINIMAL.replace("template = \"plain\"\n", &format!("template = \"plain\"\nlora = {{ {fields} }}\n"))
        };
        assert_eq!(
            parse(&lora("rank = 2, alpha = 4.0")).unwrap().policy.lora.map(|l| (l.rank, l.alpha)),
            Some((2, 4.0))
        );
        for (fields, named) in [
            ("rank = 0", "policy.lora.rank = 0"),
            ("alpha = 0.0", "policy.lora.alpha = 0"),
            ("target_regex = \"(\"", "policy.lora.target_regex"),
        ] {
            let error = parse(&lora(fields)).unwrap_err().to_string();
            assert!(error.contains(named), "{error}");
        }
        let reward_model = |fields: &str| format!("{MINIMAL}[reward_model]\nkind = \"train\"\n{fields}\n");
        parse(&reward_model("hidden_size = 32\nintermediate_size = 256")).unwrap();
        for (fields, named) in [
            ("intermediate_size = 0", "intermediate_size = 0"),
            ("hidden_size = 30", "hidden_size = 30"),
            ("num_layers = 0", "num_layers = 0"),
        ] {
            let error = parse(&reward_model(fields)).unwrap_err().to_string();
            assert!(error.contains(&format!("reward_model.{named}")), "{error}");
        }
        let causal = |fields: &str| format!("{MINIMAL}[reward_model]\nkind = \"causal_lm\"\n{fields}\n");
        let study =
            parse(&causal("from_base = true\nlora = { rank = 4, alpha = 8.0 }\ntraining = { steps = 5 }")).unwrap();
        assert!(matches!(
            study.reward_model,
            Some(RewardModelSpec::CausalLm {
                from_base: true,
                lora: Some(_),
                max_tokens: 512,
                score: CausalScore::LastToken,
                beta: None,
                ..
            })
        ));
        let study = parse(&causal("from_base = true\nscore = \"likelihood\"")).unwrap();
        assert!(matches!(
            study.reward_model,
            Some(RewardModelSpec::CausalLm { score: CausalScore::Likelihood, beta: None, .. })
        ));
        for (fields, named) in [
            ("", "needs model"),
            ("from_base = true\nmodel = \"o/n\"", "both model and from_base"),
            ("from_base = true\nlora = { rank = 0 }", "reward_model.lora.rank = 0"),
            ("from_base = true\nmax_tokens = 1", "reward_model.max_tokens = 1"),
            ("from_base = true\ntraining = { token_loss_weight = 1.0 }", "reward_model.training.token_loss_weight"),
            ("model = \"./no-such-dir\"", "reward_model.model"),
            ("from_base = true\nbeta = 5.0", "reward_model.beta is the scale"),
            ("from_base = true\nscore = \"likelihood\"\nbeta = 0.0", "reward_model.beta = 0"),
            ("from_base = true\nscore = \"mean\"", "reward_model.score"),
        ] {
            let error = parse(&causal(fields)).unwrap_err().to_string();
            assert!(error.contains(named), "{fields}: {error}");
        }
        let study = parse(&reward_model("policy_samples = { problems = 16 }")).unwrap();
        let samples = study.reward_model.as_ref().and_then(RewardModelSpec::policy_samples).unwrap();
        assert_eq!((samples.problems, samples.samples, samples.max_pairs_per_problem), (16, 8, 4));
        for (rm, named) in [
            (reward_model("policy_samples = { problems = 0 }"), "reward_model.policy_samples.problems = 0"),
            (reward_model("policy_samples = { problems = 4, samples = 1 }"), "reward_model.policy_samples.samples = 1"),
            (reward_model("policy_samples = { problems = 4, temperature = 0.0 }"), "policy_samples.temperature = 0"),
            (reward_model("policy_samples = { problems = 4, max_new_tokens = 0 }"), "policy_samples.max_new_tokens"),
            (reward_model("policy_samples = { problems = 4, max_pairs_per_problem = 0 }"), "max_pairs_per_problem"),
            (reward_model("policy_samples = { problems = 4, sample = 2 }"), "reward_model.policy_samples"),
            (
                format!(
                    "{MINIMAL}[reward_model]\nkind = \"checkpoint\"\nmodel = \"o/n@main\"\npolicy_samples = {{ problems = 4 }}\n"
                ),
                "no fine_tune",
            ),
        ] {
            let error = parse(&rm).unwrap_err().to_string();
            assert!(error.contains(named), "{rm}: {error}");
        }
    }

    /// GRPO's TRL-named knobs and DAPO's overlong punishment are accepted in study files; a
    /// misspelt knob or a bad value is an error that names it.
    #[test]
    fn grpo_knobs_and_the_overlong_punishment_are_study_settings() {
        let knobs = "config = { beta = 0.04, importance_sampling_level = \"sequence\", loss_type = \"grpo\", delta = 1.5, \
                     top_entropy_quantile = 0.2, entropy_coef = 0.001, sync_ref_model = true, ref_model_mixup_alpha = 0.5, \
                     ref_model_sync_steps = 8, scale_rewards = \"batch\", zero_std_groups = \"skip\" }\n";
        let study = parse(&format!("{MINIMAL}{knobs}")).unwrap();
        let MethodSpec::Rl { config, .. } = &study.methods["grpo"] else { panic!() };
        assert_eq!(config["importance_sampling_level"], "sequence");
        for (text, named) in [
            ("config = { top_entropy_quantiles = 0.2 }\n", "unknown field `top_entropy_quantiles`"),
            (
                "config = { importance_sampling_level = \"sequence_token\" }\n",
                "config.importance_sampling_level: unknown variant `sequence_token`",
            ),
            ("config = { delta = 0.5 }\n", "grpo.delta = 0.5"),
            ("config = { sync_ref_model = true }\n", "sync_ref_model = true with beta = 0"),
        ] {
            let error = parse(&format!("{MINIMAL}{text}")).expect_err(named).to_string();
            assert!(error.contains("methods.grpo.config") && error.contains(named), "expected {named:?} in: {error}");
        }
        let overlong = |fields: &str| {
            MINIMAL.replace(
                "rules = [{ kind = \"strict_correct\", format = \"gsm8k_marker\" }]",
                &format!("rules = [{{ kind = \"strict_correct\", format = \"gsm8k_marker\" }}, {{ kind = \"soft_overlong_punishment\", {fields} }}]"),
            )
        };
        let study = parse(&overlong("max_completion_len = 64, soft_punish_cache = 16")).unwrap();
        assert_eq!(
            study.reward_sources["rules"].rules[1].kind,
            RewardKind::SoftOverlongPunishment { max_completion_len: 64, soft_punish_cache: 16 }
        );
        let error = parse(&overlong("max_completion_len = 8, soft_punish_cache = 16")).unwrap_err().to_string();
        assert!(error.contains("reward_sources.rules.rules[1]") && error.contains("soft_punish_cache = 16"), "{error}");
        assert!(parse(&overlong("max_completion_len = 8")).is_err(), "soft_punish_cache is required");
    }

    /// `checkpoint_every`: 10 when absent, 0 (never) allowed, a wrong value names the field; the
    /// SmolLM2 study, with steps of minutes, checkpoints every 2.
    #[test]
    fn checkpoint_every_defaults_to_ten_and_zero_turns_it_off() {
        assert_eq!(parse(MINIMAL).unwrap().checkpoint_every, 10);
        let with = |value: &str| format!("checkpoint_every = {value}\n{MINIMAL}");
        assert_eq!(parse(&with("0")).unwrap().checkpoint_every, 0);
        assert_eq!(parse(&with("3")).unwrap().checkpoint_every, 3);
        for value in ["-1", "\"often\""] {
            let error = parse(&with(value)).unwrap_err().to_string();
            assert!(error.contains("checkpoint_every"), "{value}: {error}");
        }
        let smollm = Study::load(&configs_dir().join("smollm2-135m-arithmetic.toml")).unwrap();
        assert_eq!(smollm.checkpoint_every, 2);
    }

    /// Type errors inside `[methods.x]` used to name the table only (serde's tagged enums buffer
    /// it); now they name the field.
    #[test]
    fn errors_inside_a_method_name_the_field() {
        let cases = [
            (MINIMAL.replace("steps = 2", "steps = \"two\""), "methods.grpo.steps: invalid type: string \"two\""),
            (format!("{MINIMAL}prompts_per_step = -1\n"), "methods.grpo.prompts_per_step: "),
            (format!("{MINIMAL}optim = {{ learning_rate = \"high\" }}\n"), "methods.grpo.optim.learning_rate: "),
            (format!("{MINIMAL}stepz = 3\n"), "stepz"),
            (MINIMAL.replace("steps = 2\n", ""), "methods.grpo: missing field `steps`"),
            (format!("{MINIMAL}[methods.fs]\nkind = \"few_shot\"\nk = \"3\"\n"), "methods.fs.k: invalid type"),
            (format!("{MINIMAL}[methods.b]\nkind = \"base\"\nk = 3\n"), "unknown field `k`"),
            (format!("{MINIMAL}[methods.b]\nkind = \"bse\"\n"), "methods.b.kind: unknown variant `bse`"),
            (format!("{MINIMAL}[methods.b]\nk = 3\n"), "methods.b: missing field `kind`"),
        ];
        for (text, named) in cases {
            let error = parse(&text).expect_err(named).to_string();
            assert!(error.contains(named), "expected {named:?} in: {error}");
        }
        let study =
            parse(&format!("{MINIMAL}[methods.fs]\nkind = \"few_shot\"\nk = 3\n[methods.b]\nkind = \"base\"\n"))
                .unwrap();
        assert_eq!(study.methods["fs"], MethodSpec::FewShot { k: 3 });
        assert_eq!(study.methods["b"], MethodSpec::Base {});
        let MethodSpec::Rl { prompts_per_step, config, .. } = &study.methods["grpo"] else { panic!() };
        assert_eq!((*prompts_per_step, config.clone()), (4, serde_json::json!({})), "defaults as before");
    }

    /// The TRL-level settings of RLOO, PPO and AdamW are accepted in study files, and their
    /// mistakes name the method and the field.
    #[test]
    fn rloo_ppo_and_adamw_settings_are_accepted_and_checked() {
        let methods = "[methods.rloo]\nkind = \"rl\"\nalgorithm = \"rloo\"\nreward_sources = [\"rules\"]\nsteps = 2\n\
             optim = { adamw = { weight_decay = 0.1 } }\n\
             config = { kl_in = \"loss\", beta = 0.02, epsilon = 0.2, epsilon_high = 0.28, normalize_advantages = true }\n\
             [methods.ppo]\nkind = \"rl\"\nalgorithm = \"ppo\"\nreward_sources = [\"rules\"]\nsteps = 2\n\
             config = { whiten_rewards = true, missing_eos_penalty = 1.0, adaptive_kl = { target = 6.0, horizon = 10000 }, value_model = \"separate\" }\n";
        let study = parse(&format!("{MINIMAL}{methods}")).unwrap();
        let MethodSpec::Rl { optim, .. } = &study.methods["rloo"] else { panic!() };
        assert_eq!(optim.adamw.weight_decay, 0.1);
        let MethodSpec::Rl { optim, .. } = &study.methods["grpo"] else { panic!() };
        assert_eq!(optim.adamw.weight_decay, 0.0, "transformers' default");
        for (change, named) in [
            (
                "kl_in = \"loss\"",
                "methods.rloo.config: [rloo] config.kl_in: unknown variant `logits`, expected `reward` or `loss`",
            ),
            ("epsilon = 0.2,", "methods.rloo.config: rloo.epsilon = 1.5"),
            ("horizon = 10000", "methods.ppo.config: ppo.adaptive_kl = { target = 6, horizon = 0 }"),
        ] {
            let replacement = match change {
                "kl_in = \"loss\"" => "kl_in = \"logits\"",
                "epsilon = 0.2," => "epsilon = 1.5,",
                _ => "horizon = 0",
            };
            let error =
                parse(&format!("{MINIMAL}{}", methods.replace(change, replacement))).expect_err(named).to_string();
            assert!(error.contains(named), "expected {named:?} in: {error}");
        }
    }

    /// The same for the other tagged tables: the task, the base and the reward model (their type
    /// errors named only `[task]`, `[policy.base]`, `[reward_model]`), nested tables included.
    #[test]
    fn errors_inside_the_task_base_and_reward_model_name_the_field() {
        let cases = [
            (
                MINIMAL.replace("preset = \"tiny_gpt_neo\"", "preset = \"tiny_gpt_neo\"\nvocab_size = \"big\""),
                "policy.base.vocab_size: invalid type: string \"big\", expected usize",
            ),
            (
                MINIMAL.replace("preset = \"tiny_gpt_neo\"", "preset = \"tiny_gpt_neo\"\nsft = { steps = \"x\" }"),
                "policy.base.sft.steps: invalid type: string \"x\", expected u64",
            ),
            (
                MINIMAL.replace("preset = \"tiny_gpt_neo\"", "preset = \"tiny_gpt_nep\""),
                "policy.base.preset: unknown variant `tiny_gpt_nep`",
            ),
            (MINIMAL.replace("kind = \"preset\"", "kind = \"presets\""), "policy.base.kind: unknown variant `presets`"),
            (
                MINIMAL.replace("kind = \"synthetic\"", "kind = \"synthetic\"\nsynthetic = { train_size = \"x\" }"),
                "task.synthetic.train_size: invalid type: string \"x\"",
            ),
            (
                MINIMAL.replace("kind = \"synthetic\"", "kind = \"gsm8k\"\ntrain_limit = -3"),
                "task.train_limit: invalid value: integer `-3`",
            ),
            (
                MINIMAL.replace("kind = \"synthetic\"", "kind = \"gsm8k\"\nsteps = 3"),
                "task.steps: unknown field `steps`",
            ),
            (
                format!("{MINIMAL}[reward_model]\nkind = \"train\"\nhidden_size = \"x\"\n"),
                "reward_model.hidden_size: invalid type: string \"x\", expected usize",
            ),
            (
                format!("{MINIMAL}[reward_model]\nkind = \"train\"\ntraining = {{ learning_rate = \"fast\" }}\n"),
                "reward_model.training.learning_rate: invalid type: string \"fast\"",
            ),
            (format!("{MINIMAL}[reward_model]\nkind = \"checkpoint\"\n"), "reward_model: missing field `model`"),
        ];
        for (text, named) in cases {
            let error = parse(&text).expect_err(named).to_string();
            assert!(error.contains(named), "expected {named:?} in: {error}");
        }
    }

    /// Names become directories under reports/<study>/: before they were checked, `../../x`,
    /// an absolute name, an empty name and a method named `../../../../m` wrote outside it.
    #[test]
    fn names_that_would_leave_the_report_directory_are_refused() {
        for bad in ["../../x", "/tmp/abs", "", ".hidden", "a/b", "a\\b", "sp ace"] {
            let text = MINIMAL.replace("name = \"t\"", &format!("name = {bad:?}"));
            let error = parse(&text).expect_err(bad).to_string();
            assert!(error.contains("name = ") && error.contains("not a usable name"), "{bad:?}: {error}");
        }
        let method = MINIMAL.replace("[methods.grpo]", "[methods.\"../../../../m\"]");
        let error = parse(&method).unwrap_err().to_string();
        assert!(error.contains("[methods.\"../../../../m\"]"), "{error}");
        let source =
            MINIMAL.replace("[reward_sources.rules]", "[reward_sources.\"../r\"]").replace("[\"rules\"]", "[\"../r\"]");
        let error = parse(&source).unwrap_err().to_string();
        assert!(error.contains("[reward_sources.\"../r\"]"), "{error}");
        // Ordinary names still pass, dots and dashes included.
        parse(&MINIMAL.replace("name = \"t\"", "name = \"gsm8k-gpt_neo-1.3b\"")).unwrap();
    }

    #[test]
    fn zero_sizes_bad_rates_and_repeated_seeds_are_errors_that_name_the_field() {
        let sft = |fields: &str| {
            MINIMAL.replace("preset = \"tiny_gpt_neo\"\n", &format!("preset = \"tiny_gpt_neo\"\n{fields}\n"))
        };
        let cases: Vec<(String, &str)> = vec![
            (sft("sft = { steps = 0 }"), "policy.base.sft.steps = 0"),
            (sft("sft = { batch_size = 0 }"), "policy.base.sft.batch_size = 0"),
            (sft("sft = { learning_rate = 0.0 }"), "policy.base.sft.learning_rate = 0"),
            (sft("sft = { learning_rate = -1e-3 }"), "policy.base.sft.learning_rate = -0.001"),
            (sft("sft = { learning_rate = nan }"), "policy.base.sft.learning_rate = NaN"),
            (sft("sft = { learning_rate = inf }"), "policy.base.sft.learning_rate = inf"),
            (sft("sft = { data_fraction = 0.0 }"), "policy.base.sft.data_fraction = 0"),
            (sft("sft = { data_fraction = 1.5 }"), "policy.base.sft.data_fraction = 1.5"),
            (sft("vocab_size = 0"), "policy.base.vocab_size = 0"),
            (sft("vocab_size = 257"), "policy.base.vocab_size = 257"),
            (
                MINIMAL.replace("template = \"plain\"\n", "template = \"plain\"\nmax_length = 0\n"),
                "policy.max_length = 0",
            ),
            (format!("{MINIMAL}prompts_per_step = 0\n"), "methods.grpo.prompts_per_step = 0"),
            (format!("{MINIMAL}[evaluation]\nbatch_size = 0\n"), "evaluation.batch_size = 0"),
            (format!("{MINIMAL}[evaluation]\nmax_new_tokens = 0\n"), "evaluation.max_new_tokens = 0"),
            (format!("{MINIMAL}[evaluation]\ntest_size = 0\n"), "evaluation.test_size = 0"),
            (
                format!("{MINIMAL}[reward_model]\nkind = \"train\"\ntraining = {{ batch_size = 0 }}\n"),
                "reward_model.training.batch_size = 0",
            ),
            (
                format!("{MINIMAL}[reward_model]\nkind = \"train\"\ntraining = {{ learning_rate = 0.0 }}\n"),
                "reward_model.training.learning_rate = 0",
            ),
            (
                format!(
                    "{MINIMAL}[reward_model]\nkind = \"checkpoint\"\nmodel = \"o/n\"\nfine_tune = {{ learning_rate = -1.0 }}\n"
                ),
                "reward_model.fine_tune.learning_rate = -1",
            ),
            (format!("seeds = [0, 1, 0]\n{MINIMAL}"), "seeds lists 0 twice"),
        ];
        for (text, named) in cases {
            let error = parse(&text).expect_err(named).to_string();
            assert!(error.contains(named), "expected {named:?} in: {error}");
        }
        let checkpoint = MINIMAL.replace(
            "kind = \"preset\"\npreset = \"tiny_gpt_neo\"",
            "kind = \"checkpoint\"\nmodel = \"./no-such-checkpoint\"",
        );
        let error = parse(&checkpoint).unwrap_err().to_string();
        assert!(error.contains("policy.base.model") && error.contains("does not exist"), "{error}");
        let error = parse(&format!("{MINIMAL}[reward_model]\nkind = \"checkpoint\"\nmodel = \"distilroberta-base\"\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("reward_model.model") && error.contains("owner/name"), "{error}");
        // The smallest vocabulary the trainer honours is accepted.
        parse(&sft(&format!("vocab_size = {}", policy_models::presets::MIN_TRAINED_VOCAB))).unwrap();
    }
}
