//! LoRA adapters in PEFT's layout, so that a LoRA run's adapters load in
//! `peft.PeftModel.from_pretrained(base, dir)` as well as in cotlab.
//!
//! burn's `Linear` stores its weight as [in, out] and `y = x W`; burn's LoRA adds
//! `scale * A B` to it with A [in, r], B [r, out] and `scale = alpha / r`. PyTorch's
//! `nn.Linear` stores [out, in] and `y = x W^T`; PEFT adds `(lora_alpha / r) * lora_B lora_A`
//! to it with `lora_A.weight` [r, in] and `lora_B.weight` [out, r]. Transposing burn's update,
//! `(s A B)^T = s B^T A^T`, so `lora_A.weight = A^T` and `lora_B.weight = B^T`, with
//! `r` and `lora_alpha = scale * r` as they are.
//!
//! The keys are PEFT's: `base_model.model.` + the transformers module path + `.lora_A.weight`
//! (PEFT drops the adapter name `default` when saving). The module paths come from the same key
//! table that writes `model.safetensors` (each architecture's `export`), so they cannot drift.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::nn::Linear;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::model::CausalLm;
use crate::weights::{LoadError, WeightMap, WeightWriter};

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The folder of a saved LoRA model ([`CausalLm::save_dir`]) that holds its adapters. Not the
/// checkpoint directory itself: transformers' `from_pretrained` applies adapter files it finds
/// beside `config.json` on top of the weights, which here are already merged (the update would
/// count twice; `tools/parity/make_lora_fixtures.py` shows it).
pub const ADAPTER_SUBDIR: &str = "adapter";
/// What PEFT's `PeftModelForCausalLM` puts before the transformers key of a module.
const PEFT_KEY_PREFIX: &str = "base_model.model.";

/// One linear of an export: its transformers prefix and, when adapted, its LoRA factors.
#[derive(Clone)]
pub(crate) struct LinearEntry {
    pub(crate) prefix: String,
    pub(crate) adapter: Option<Factors>,
}

/// A LoRA adapter's factors in burn's orientation (A [in, r], B [r, out]) and parameter ids.
#[derive(Clone)]
pub(crate) struct Factors {
    a_id: ParamId,
    b_id: ParamId,
    a: Tensor<2>,
    b: Tensor<2>,
    scale: f64,
}

impl LinearEntry {
    pub(crate) fn of(prefix: &str, linear: &Linear) -> Self {
        let adapter = linear.weight.adapter().map(|adapter| Factors {
            a_id: adapter.a.id,
            b_id: adapter.b.id,
            a: adapter.a.val(),
            b: adapter.b.val(),
            scale: adapter.scale,
        });
        Self { prefix: prefix.to_string(), adapter }
    }
}

/// `adapter_config.json`: the fields PEFT's `LoraConfig` reads, with the values that make PEFT
/// compute what cotlab computes (no dropout at inference, no bias, plain `alpha / r` scaling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Always `CAUSAL_LM`.
    pub task_type: String,
    /// The checkpoint the adapters were trained on (a directory or hub id), when known.
    pub base_model_name_or_path: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scale numerator: PEFT scales by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Adapted modules: short names (`q_proj`) when every module of that name is adapted, else
    /// full module paths.
    pub target_modules: Vec<String>,
    /// Dropout of the adapter input (cotlab trains without).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Adapted biases (`none`).
    #[serde(default = "no_bias")]
    pub bias: String,
    /// PEFT's Conv1D flag; the adapted modules are `nn.Linear`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// rsLoRA's `alpha / sqrt(r)` scaling (not used: burn scales by `alpha / r`).
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (not used).
    #[serde(default)]
    pub use_dora: bool,
    /// Loaded for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// Modules trained in full and saved whole (none: cotlab's value heads live elsewhere).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module ranks (empty: every adapter has rank `r`).
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    /// Per-module alphas (empty: every adapter has `lora_alpha`).
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

fn no_bias() -> String {
    "none".to_string()
}

/// The adapters of `linears` as PEFT's `adapter_config.json` and `adapter_model.safetensors` in
/// `dir`. Errors when the adapters differ in rank or scale (one PEFT config describes them all).
pub(crate) fn write_peft_adapter(
    dir: &Path,
    linears: &[LinearEntry],
    base_model_name_or_path: Option<&str>,
) -> Result<AdapterConfig, LoadError> {
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let adapted: Vec<(&str, &Factors)> =
        linears.iter().filter_map(|linear| Some((linear.prefix.as_str(), linear.adapter.as_ref()?))).collect();
    let Some((_, first)) = adapted.first() else {
        return Err(LoadError::BadConfig {
            path: config_path,
            message: "the model has no LoRA adapters to save".to_string(),
        });
    };
    let rank = first.a.dims()[1];
    if let Some((prefix, _)) =
        adapted.iter().find(|(_, factors)| factors.a.dims()[1] != rank || factors.scale != first.scale)
    {
        return Err(LoadError::BadConfig {
            path: config_path,
            message: format!(
                "the adapter of `{prefix}` has another rank or alpha than the first one; PEFT's adapter_config.json holds one (apply one LoraSettings to the whole model)"
            ),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| LoadError::Io { path: dir.to_path_buf(), source })?;
    let mut writer = WeightWriter::default();
    for (prefix, factors) in &adapted {
        writer.tensor(&format!("{PEFT_KEY_PREFIX}{prefix}.lora_A.weight"), factors.a.clone().transpose());
        writer.tensor(&format!("{PEFT_KEY_PREFIX}{prefix}.lora_B.weight"), factors.b.clone().transpose());
    }
    writer.write(&dir.join(ADAPTER_WEIGHTS_FILE))?;
    let config = AdapterConfig {
        peft_type: "LORA".to_string(),
        task_type: "CAUSAL_LM".to_string(),
        base_model_name_or_path: base_model_name_or_path.map(str::to_string),
        r: rank,
        lora_alpha: first.scale * rank as f64,
        target_modules: target_modules(linears),
        lora_dropout: 0.0,
        bias: no_bias(),
        fan_in_fan_out: false,
        use_rslora: false,
        use_dora: false,
        inference_mode: true,
        modules_to_save: None,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
    };
    let temporary = dir.join("adapter_config.json.tmp");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    std::fs::write(&temporary, serde_json::to_string_pretty(&config).expect("json")).map_err(io(&temporary))?;
    std::fs::rename(&temporary, &config_path).map_err(io(&config_path))?;
    Ok(config)
}

/// PEFT matches a target name against the end of each module path: a short name (`q_proj`)
/// adapts every module of that name, so it is used only when that is what was adapted.
fn target_modules(linears: &[LinearEntry]) -> Vec<String> {
    let short = |prefix: &str| prefix.rsplit('.').next().unwrap_or(prefix).to_string();
    let adapted: BTreeSet<String> = linears.iter().filter(|l| l.adapter.is_some()).map(|l| short(&l.prefix)).collect();
    let whole_names =
        adapted.iter().all(|name| linears.iter().filter(|l| short(&l.prefix) == *name).all(|l| l.adapter.is_some()));
    if whole_names {
        adapted.into_iter().collect()
    } else {
        linears.iter().filter(|l| l.adapter.is_some()).map(|l| l.prefix.clone()).collect()
    }
}

/// Replaces the values of the parameters it names, keeping each one's dtype and whether it
/// takes gradients.
struct SetValues(HashMap<ParamId, Tensor<2>>);

impl ModuleMapper for SetValues {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(value) = self.0.remove(&param.id) else { return param };
        let (id, old, mapper) = param.consume();
        let mut value: Tensor<D> = value.reshape(old.dims()).cast(old.dtype()).to_device(&old.device());
        if old.is_require_grad() {
            value = value.require_grad();
        }
        Param::from_mapped_value(id, value, mapper)
    }
}

impl CausalLm {
    /// Every linear with its LoRA factors, reading no weights.
    fn linear_entries(&self) -> Vec<LinearEntry> {
        let mut writer = WeightWriter::keys_only();
        self.export(&mut writer);
        writer.linears().to_vec()
    }

    /// Whether LoRA adapters are attached ([`CausalLm::with_lora`]).
    pub fn has_adapters(&self) -> bool {
        crate::optim::parameter_paths(self).iter().any(|(path, _)| path.ends_with(".lora.a"))
    }

    /// Writes the adapters alone in PEFT's layout (`adapter_config.json`,
    /// `adapter_model.safetensors`) into `dir`, naming `base_model_name_or_path` as the
    /// checkpoint they apply to. [`CausalLm::save_dir`] writes the same files into the `adapter/`
    /// folder of a merged checkpoint (without the base's name, which a model does not know).
    pub fn save_adapters(&self, dir: &Path, base_model_name_or_path: Option<&str>) -> Result<AdapterConfig, LoadError> {
        self.check_adapters_exported(dir)?;
        write_peft_adapter(dir, &self.linear_entries(), base_model_name_or_path)
    }

    /// Every adapter must sit on a linear of the key table, or PEFT's files would silently lack it.
    pub(crate) fn check_adapters_exported(&self, dir: &Path) -> Result<(), LoadError> {
        let attached =
            crate::optim::parameter_paths(self).into_iter().filter(|(path, _)| path.ends_with(".lora.a")).count();
        let exported = self.linear_entries().iter().filter(|linear| linear.adapter.is_some()).count();
        if attached != exported {
            return Err(LoadError::BadConfig {
                path: dir.join(ADAPTER_CONFIG_FILE),
                message: format!(
                    "{attached} LoRA adapters are attached but {exported} sit on linear projections; PEFT's layout holds only those. Narrow lora.target_regex to projection weights (not embeddings)"
                ),
            });
        }
        Ok(())
    }

    /// Sets the adapters' factors to those saved in `dir` by [`CausalLm::save_adapters`] or
    /// PEFT (`adapter_model.safetensors`). The model must carry adapters of the same rank and
    /// alpha on the same modules ([`CausalLm::with_lora`]); every saved factor must be used.
    pub fn load_adapters(self, dir: &Path) -> Result<Self, LoadError> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| LoadError::Io { path: config_path.clone(), source })?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|error| LoadError::BadConfig { path: config_path.clone(), message: error.to_string() })?;
        let entries = self.linear_entries();
        let adapted: Vec<(&str, &Factors)> =
            entries.iter().filter_map(|l| Some((l.prefix.as_str(), l.adapter.as_ref()?))).collect();
        let Some((_, first)) = adapted.first() else {
            return Err(LoadError::BadConfig {
                path: config_path,
                message: "the model has no LoRA adapters to load these into; attach them first (CausalLm::with_lora with the same rank and alpha)".to_string(),
            });
        };
        let (rank, alpha) = (first.a.dims()[1], first.scale * first.a.dims()[1] as f64);
        let plain =
            !config.use_rslora && !config.use_dora && config.rank_pattern.is_empty() && config.alpha_pattern.is_empty();
        if config.r != rank || (config.lora_alpha - alpha).abs() > 1e-9 * alpha.abs().max(1.0) || !plain {
            return Err(LoadError::BadConfig {
                path: config_path,
                message: format!(
                    "r = {}, lora_alpha = {}, use_rslora = {}, use_dora = {}, rank_pattern/alpha_pattern {}, but the model's adapters are plain LoRA of rank {rank} and alpha {alpha}; attach adapters with the saved settings (one rank and alpha, no rsLoRA or DoRA)",
                    config.r,
                    config.lora_alpha,
                    config.use_rslora,
                    config.use_dora,
                    if config.rank_pattern.is_empty() && config.alpha_pattern.is_empty() { "empty" } else { "set" }
                ),
            });
        }
        let device = first.a.device();
        let mut weights = WeightMap::open_files(dir, &[dir.join(ADAPTER_WEIGHTS_FILE)], &device)?;
        let mut values = HashMap::new();
        for (prefix, factors) in &adapted {
            let [d_in, r] = factors.a.dims();
            let [_, d_out] = factors.b.dims();
            let a: Tensor<2> = weights.tensor(&format!("{PEFT_KEY_PREFIX}{prefix}.lora_A.weight"), [r, d_in])?;
            let b: Tensor<2> = weights.tensor(&format!("{PEFT_KEY_PREFIX}{prefix}.lora_B.weight"), [d_out, r])?;
            values.insert(factors.a_id, a.transpose());
            values.insert(factors.b_id, b.transpose());
        }
        weights.finish()?;
        Ok(self.map(&mut SetValues(values)))
    }

    /// The base model, as PEFT's `disable_adapter()` computes it: the adapters stay attached
    /// with B = 0, so every weight is base + scale A 0 = base exactly, and the base weights are
    /// shared with `self` rather than copied (merging them into new dense weights would hold a
    /// second copy of every adapted matrix). On the inner backend, without gradients.
    pub fn adapters_disabled(&self) -> Self {
        let zeros: HashMap<ParamId, Tensor<2>> = self
            .linear_entries()
            .into_iter()
            .filter_map(|linear| linear.adapter)
            .map(|factors| (factors.b_id, factors.b.zeros_like()))
            .collect();
        self.valid().map(&mut SetValues(zeros))
    }
}

impl crate::model::LoraSettings {
    /// Checks the settings; errors start with the field's name.
    pub fn validate(&self) -> Result<(), String> {
        if self.rank == 0 {
            return Err("rank = 0: use a positive rank such as 16".to_string());
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(format!("alpha = {}: use a positive number such as twice the rank", self.alpha));
        }
        burn::module::ParamGroup::from_regex(&self.target_regex)
            .map(drop)
            .map_err(|error| format!("target_regex = {:?}: not a regular expression ({error:?})", self.target_regex))
    }
}
