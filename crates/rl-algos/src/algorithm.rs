//! The plug-in point: the trait every RL method implements, what a training step is given, the
//! optimisation settings they share, and a registry of algorithms by name.
//!
//! The study runner depends only on [`RlAlgorithm`] and [`AlgorithmEntry`]: adding a method is
//! adding a crate that implements the trait and exposes an entry, plus one line in the runner's
//! list of entries.

use std::collections::BTreeMap;
use std::path::Path;

use policy_models::CausalLm;
use policy_models::optim::{AdamWSettings, Schedule, TrainDtype};
use serde::{Deserialize, Serialize};

use crate::rewards::WeightedRewards;

/// One prompt to train on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptItem {
    /// Its tokens.
    pub prompt_ids: Vec<i64>,
    /// Its text (reward functions may read it).
    pub prompt_text: String,
    /// The gold answer, normalised.
    pub answer: String,
}

/// What a step needs from the outside world: how to turn ids into text, when generation stops,
/// and the rewards.
pub struct Environment<'a> {
    /// Ids to text (the policy's tokenizer).
    pub decode: &'a (dyn Fn(&[i64]) -> String + Sync),
    /// Tokens that end a completion.
    pub eos_token_ids: Vec<i64>,
    /// The padding id.
    pub pad_token_id: i64,
    /// Strings that end a completion (the template's).
    pub stop_strings: Vec<String>,
    /// The reward functions and their weights.
    pub rewards: &'a WeightedRewards,
}

/// Metrics of one step, by TRL's names (see the metric reference in `docs/study.md`).
pub type Metrics = BTreeMap<String, f64>;

/// Errors of a training step.
#[derive(Debug, thiserror::Error)]
pub enum RlError {
    #[error(
        "step {step}: the {quantity} is {value}; the run stops here and the last checkpoint is kept. \
         Lower the learning rate, raise beta, or set max_grad_norm"
    )]
    NotFinite { step: u64, quantity: String, value: f64 },

    #[error("{0}")]
    Config(String),

    #[error(transparent)]
    Load(#[from] policy_models::LoadError),
}

/// Optimisation settings shared by the algorithms; the defaults are PyTorch's and TRL's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSettings {
    /// Peak learning rate. Default 1e-6 (TRL's GRPO default is 1e-6; tiny models want ~1e-3).
    pub learning_rate: f64,
    /// Linear warmup, as a fraction of the total steps. Default 0.
    pub warmup_ratio: f64,
    /// Floor of the cosine decay, as a fraction of the peak. Default 1 (constant after warmup,
    /// TRL's `linear`/`constant` users set their own).
    pub min_lr_ratio: f64,
    /// AdamW settings.
    pub adamw: AdamWSettings,
    /// Global gradient-norm clip. Default 1.0 (TRL's `max_grad_norm`).
    pub max_grad_norm: Option<f64>,
    /// Optimizer steps of the whole run (for the schedule). Default 100. An algorithm step can
    /// take several optimizer steps (PPO's epochs x minibatches, GRPO's iterations): the study
    /// runner sets this from [`AlgorithmEntry::run_optim`], whatever a study file says.
    pub total_steps: u64,
    /// The precision of the training passes, and of sampling and scoring: `bf16` computes on a
    /// bf16 copy of f32 master weights (TRL's `bf16=True`; see [`TrainDtype`]). Default f32.
    #[serde(skip_serializing_if = "TrainDtype::is_f32")]
    pub dtype: TrainDtype,
}

impl Default for OptimSettings {
    fn default() -> Self {
        Self {
            learning_rate: 1e-6,
            warmup_ratio: 0.0,
            min_lr_ratio: 1.0,
            adamw: AdamWSettings::default(),
            max_grad_norm: Some(1.0),
            total_steps: 100,
            dtype: TrainDtype::F32,
        }
    }
}

impl OptimSettings {
    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            learning_rate: self.learning_rate,
            warmup_steps: (self.warmup_ratio * self.total_steps as f64).round() as u64,
            total_steps: self.total_steps,
            min_lr_ratio: self.min_lr_ratio,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(format!("learning_rate = {}: use a positive number such as 1e-5", self.learning_rate));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(format!("warmup_ratio = {}: use a fraction in [0, 1)", self.warmup_ratio));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(format!("min_lr_ratio = {}: use a fraction in [0, 1]", self.min_lr_ratio));
        }
        if self.max_grad_norm.is_some_and(|norm| !(norm > 0.0)) {
            return Err("max_grad_norm must be positive (or absent for no clipping)".to_string());
        }
        Ok(())
    }
}

/// An RL method as the study runner drives it.
pub trait RlAlgorithm: Send {
    /// The registered name (`grpo`, `ppo`, `rloo`).
    fn name(&self) -> &'static str;

    /// One step: sample completions for `prompts`, reward them, compute advantages, update the
    /// policy. Returns the step's metrics.
    fn train_step(&mut self, prompts: &[PromptItem], environment: &Environment<'_>) -> Result<Metrics, RlError>;

    /// Steps taken.
    fn steps(&self) -> u64;

    /// The policy being trained (on an autodiff device).
    fn policy(&self) -> &CausalLm;

    /// Hands the trained policy back.
    fn into_policy(self: Box<Self>) -> CausalLm;

    /// Writes everything a resumed run needs into `dir` (policy in the Hugging Face layout,
    /// optimizer state, step count, any extra modules). Sampling seeds derive from (seed, step),
    /// so no generator state needs saving.
    fn save_checkpoint(&self, dir: &Path) -> Result<(), RlError>;
}

/// The frozen reference of KL penalties: the starting policy without gradients and, for a LoRA
/// policy, with its adapters disabled (the base, as TRL computes the reference of a PEFT model
/// with `disable_adapter()`), whatever the adapters hold.
pub fn reference_policy(policy: &CausalLm) -> CausalLm {
    policy.adapters_disabled()
}

/// The policy of a checkpoint written by [`RlAlgorithm::save_checkpoint`] (`dir/policy`). A LoRA
/// run resumes as `start` (the run's base with adapters attached) with the saved adapters
/// loaded: the merged weights in `dir/policy` cannot be split back into a frozen base and
/// trainable adapters.
pub fn checkpoint_policy(start: &CausalLm, dir: &Path) -> Result<CausalLm, RlError> {
    let policy_dir = dir.join("policy");
    let adapter_dir = policy_dir.join(policy_models::lora::ADAPTER_SUBDIR);
    if start.has_adapters() {
        return Ok(start.clone().load_adapters(&adapter_dir)?);
    }
    if adapter_dir.join(policy_models::lora::ADAPTER_CONFIG_FILE).is_file() {
        return Err(RlError::Config(format!(
            "{} holds a LoRA run's adapters but the starting policy has none; attach the run's adapters (CausalLm::with_lora) to the starting policy before resuming",
            policy_dir.display()
        )));
    }
    let device = burn::module::Module::devices(start).into_iter().next().expect("the policy has parameters");
    Ok(CausalLm::load_dir(&policy_dir, &device)?)
}

/// The step count and seed of an RL checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Algorithm steps completed.
    pub steps: u64,
    /// The run's seed.
    pub seed: u64,
}

impl CheckpointState {
    /// Writes `state.json`.
    pub fn write(&self, dir: &Path) -> Result<(), RlError> {
        let path = dir.join("state.json");
        std::fs::write(&path, serde_json::to_string_pretty(self).expect("json"))
            .map_err(|source| RlError::Load(policy_models::LoadError::Io { path, source }))
    }

    /// Reads `state.json`.
    pub fn read(dir: &Path) -> Result<Self, RlError> {
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| RlError::Load(policy_models::LoadError::Io { path: path.clone(), source }))?;
        serde_json::from_str(&text).map_err(|error| RlError::Config(format!("{}: {error}", path.display())))
    }
}

/// How the runner builds an algorithm: the policy to train (on an autodiff device), its config
/// block from the study file (JSON, whatever the file format), and the shared settings.
pub struct AlgorithmInputs {
    /// The policy.
    pub policy: CausalLm,
    /// The algorithm's own config block.
    pub config: serde_json::Value,
    /// Optimisation settings.
    pub optim: OptimSettings,
    /// Seed of sampling.
    pub seed: u64,
}

/// What one training step samples and trains on, for cost estimates (`compare --dry-run`) and
/// for the runner's prompt budget (a prompt plus its longest completion must fit the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutShape {
    /// Completions sampled per prompt (GRPO's and RLOO's `num_generations`; PPO's 1).
    pub completions_per_prompt: usize,
    /// Tokens a completion may reach (`max_completion_length`).
    pub max_completion_length: usize,
    /// Sampling rounds at most: 1, or more where groups may be drawn again (GRPO's resampling of
    /// zero-variance groups, DAPO's dynamic sampling, re-draws at most every group
    /// `max_resample_tries` more times).
    pub max_sampling_rounds: usize,
    /// Forward and backward passes over each completion (GRPO's `num_iterations`, PPO's
    /// `num_ppo_epochs`).
    pub training_passes: usize,
}

/// A registry entry: a name and a constructor.
#[derive(Clone, Copy)]
pub struct AlgorithmEntry {
    /// The name study files use.
    pub name: &'static str,
    /// Validates the config block without building anything (for `--dry-run` and config tests).
    pub validate: fn(&serde_json::Value) -> Result<(), String>,
    /// The config block as the algorithm reads it, every default filled in (see
    /// [`resolved_config`]).
    pub resolve: fn(&serde_json::Value) -> Result<serde_json::Value, String>,
    /// Optimizer steps one training step takes with this config block and this many prompts
    /// per step (the learning-rate schedule counts optimizer steps, not training steps).
    pub optimizer_steps_per_step: fn(&serde_json::Value, usize) -> Result<u64, String>,
    /// The rollout shape of one training step with this config block (its defaults filled in).
    pub rollout_shape: fn(&serde_json::Value) -> Result<RolloutShape, String>,
    /// Builds the algorithm.
    pub build: fn(AlgorithmInputs) -> Result<Box<dyn RlAlgorithm>, RlError>,
    /// Rebuilds it from a checkpoint written by [`RlAlgorithm::save_checkpoint`]; the inputs'
    /// policy is the run's starting policy (the reference).
    pub resume: fn(AlgorithmInputs, &Path) -> Result<Box<dyn RlAlgorithm>, RlError>,
}

impl AlgorithmEntry {
    /// The settings of a run of `steps` training steps of `prompts_per_step` prompts: `optim`
    /// with its schedule spanning the run's optimizer steps (steps x
    /// [`Self::optimizer_steps_per_step`]); the warmup, a ratio of the total, scales with it.
    pub fn run_optim(
        &self,
        config: &serde_json::Value,
        optim: &OptimSettings,
        steps: u64,
        prompts_per_step: usize,
    ) -> Result<OptimSettings, String> {
        let per_step = (self.optimizer_steps_per_step)(config, prompts_per_step)?;
        Ok(OptimSettings { total_steps: steps.saturating_mul(per_step), ..optim.clone() })
    }
}

/// Parses and validates a config block with serde, naming the algorithm in errors, and the
/// field too: serde's message for a bad value ("unknown variant `dapoo`, expected one of ...",
/// "invalid type") does not say which field held it.
pub fn parse_config<T: serde::de::DeserializeOwned>(name: &str, value: &serde_json::Value) -> Result<T, String> {
    serde_json::from_value(value.clone()).map_err(|error| match culprit::<T>(value, &error.to_string()) {
        Some(field) => format!("[{name}] config.{field}: {error}"),
        None => format!("[{name}] config: {error}"),
    })
}

/// The field of the object `value` whose value `error` is about: the one whose removal lets the
/// block parse (or fail only for lacking that field). `None` when the error names its field
/// already (unknown or missing fields) or no single field explains it.
fn culprit<T: serde::de::DeserializeOwned>(value: &serde_json::Value, error: &str) -> Option<String> {
    let object = value.as_object()?;
    if error.contains("unknown field") || error.contains("missing field") {
        return None;
    }
    object.keys().find_map(|key| {
        let mut without = object.clone();
        without.remove(key);
        match serde_json::from_value::<T>(serde_json::Value::Object(without)) {
            Ok(_) => Some(key.clone()),
            Err(other) if other.to_string().contains(&format!("missing field `{key}`")) => Some(key.clone()),
            Err(_) => None,
        }
    })
}

/// A config block parsed, validated and written back with every default filled in. A study
/// cell's identity records this, not the block as written, so that a changed default (a new
/// release's) counts as a changed setting and the cell is not silently reused.
pub fn resolved_config<T: serde::de::DeserializeOwned + serde::Serialize>(
    name: &str,
    value: &serde_json::Value,
    validate: fn(&T) -> Result<(), String>,
) -> Result<serde_json::Value, String> {
    let config = parse_config::<T>(name, value)?;
    validate(&config)?;
    serde_json::to_value(&config).map_err(|error| format!("[{name}] config: {error}"))
}
