//! Training utilities with PyTorch's semantics, written out rather than taken from burn where
//! burn differs: AdamW with `torch.optim.AdamW`'s update and betas / epsilon given explicitly
//! (burn's default epsilon is 1e-5 and weight decay 1e-4; PyTorch's epsilon is 1e-8), gradient clipping by the
//! *global* norm over all parameters as `torch.nn.utils.clip_grad_norm_` (burn clips each tensor
//! on its own), and the linear-warmup cosine schedule of transformers'
//! `get_cosine_schedule_with_warmup`. Weight decay follows transformers' `Trainer` rather than
//! bare `torch.optim.AdamW`: 0 by default (`TrainingArguments.weight_decay`), and when set it
//! applies to every parameter except biases and normalisation weights
//! (`Trainer.get_decay_parameter_names`; see [`decays`]). Optimizer state is keyed by parameter path, so it saves to
//! and restores from safetensors across processes (burn's own record is keyed by parameter ids,
//! which a model reloaded from safetensors does not keep).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{FloatDType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::weights::{LoadError, WeightMap, WeightWriter};

/// AdamW settings; the defaults are transformers' `TrainingArguments` (torch's betas and eps, no decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWSettings {
    /// First-moment decay. PyTorch default 0.9.
    pub beta1: f64,
    /// Second-moment decay. PyTorch default 0.999 (the TRL GRPO demo uses 0.99).
    pub beta2: f64,
    /// Added to the root of the second moment. PyTorch default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay, applied as p *= 1 - lr * weight_decay to the parameters that
    /// [`decays`] selects (not biases, not LayerNorm / RMSNorm weights). Default 0.0, as
    /// transformers' `TrainingArguments` (bare `torch.optim.AdamW` would use 0.01 on everything).
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Whether weight decay applies to the parameter at dotted `path` whose field belongs to a module
/// of type `holder` (burn's container type, `Struct:LayerNorm`): transformers'
/// `Trainer.get_decay_parameter_names`, which leaves out parameters of `nn.LayerNorm` layers and
/// any whose lower-cased name matches `bias`, `layernorm`, `rmsnorm`, `(^|\.)norm($|\.)` or
/// `_norm($|\.)`. Burn's norms name their weights `gamma` / `beta`, so the layer type matters
/// (GPT-Neo's `ln_1.gamma`); RMSNorm counts as a norm layer here as its name patterns do there.
pub fn decays(path: &str, holder: &str) -> bool {
    let holder = holder.rsplit(':').next().unwrap_or(holder);
    if matches!(holder, "LayerNorm" | "RmsNorm") {
        return false;
    }
    let lower = path.to_lowercase();
    let by_name = ["bias", "layernorm", "rmsnorm"].iter().any(|pattern| lower.contains(pattern))
        || lower.split('.').any(|segment| segment == "norm" || segment.ends_with("_norm"));
    !by_name
}

/// Linear warmup from 0, then cosine decay to `min_lr_ratio` x the peak (transformers'
/// `get_cosine_schedule_with_warmup` when `min_lr_ratio` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// Total optimizer steps.
    pub total_steps: u64,
    /// Floor of the cosine, as a fraction of the peak.
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The learning rate used at optimizer step `step` (0-based, as the LambdaLR's
    /// `last_epoch` when the step is taken).
    pub fn learning_rate_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.learning_rate * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// Visits float parameters with their dotted module paths.
struct PathVisitor<'a> {
    path: Vec<String>,
    /// The container type of each entered field (a parameter's last one is the module holding it).
    holders: Vec<String>,
    found: &'a mut Vec<(String, ParamId)>,
    /// When set, each parameter's values too (for tests that compare weights by path).
    values: Option<&'a mut std::collections::BTreeMap<String, Vec<f32>>>,
    /// When set, the ids of the parameters [`decays`] leaves out.
    no_decay: Option<&'a mut HashSet<ParamId>>,
}

impl<'a> PathVisitor<'a> {
    fn new(found: &'a mut Vec<(String, ParamId)>) -> Self {
        Self { path: Vec::new(), holders: Vec::new(), found, values: None, no_decay: None }
    }
}

impl ModuleVisitor for PathVisitor<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.holders.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.holders.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        if let Some(values) = self.values.as_mut() {
            values.insert(
                path.clone(),
                param.base().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data"),
            );
        }
        let holder = self.holders.last().map_or("", String::as_str);
        if let Some(no_decay) = self.no_decay.as_mut().filter(|_| !decays(&path, holder)) {
            no_decay.insert(param.id);
        }
        self.found.push((path, param.id));
    }
}

/// Every float parameter of `module` with its dotted path (`body.GptNeo.blocks.0.query.weight`).
pub fn parameter_paths<M: Module>(module: &M) -> Vec<(String, ParamId)> {
    let mut found = Vec::new();
    module.visit(&mut PathVisitor::new(&mut found));
    found
}

/// The ids of `module`'s parameters that weight decay leaves out (see [`decays`]).
pub fn no_decay_parameters<M: Module>(module: &M) -> HashSet<ParamId> {
    let (mut found, mut no_decay) = (Vec::new(), HashSet::new());
    module.visit(&mut PathVisitor { no_decay: Some(&mut no_decay), ..PathVisitor::new(&mut found) });
    no_decay
}

/// Draws every lazily initialised parameter of `module` now, in field order, and returns it.
/// burn samples a fresh parameter on its first use, from the device's shared generator, so
/// without this a model's initial weights depend on whatever else draws from that generator
/// (another model, another thread) between `device.seed(..)` and the first forward pass.
pub fn initialize_now<M: Module>(module: M) -> M {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
    module
}

/// The precision a trainer computes in (`dtype` in training settings; TRL's `bf16` flag).
///
/// `bf16` is mixed precision: the parameters and the optimizer's moments stay f32 (the master
/// weights), and every forward and backward pass runs on a bf16 copy of them made for that pass
/// (products in bf16 with f32 accumulation), whose gradients flow back through the cast as f32.
/// A model trained *in* bf16 would lose its updates: at a learning rate of 1e-6 an AdamW step
/// moves a weight of 0.02 by 5e-5 of itself, far below bf16's resolution (2^-8 = 0.4%).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainDtype {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 passes over f32 master weights.
    Bf16,
}

impl TrainDtype {
    /// The dtype of the passes' working copy; `None` when they run on the parameters themselves.
    pub fn working(self) -> Option<FloatDType> {
        match self {
            TrainDtype::F32 => None,
            TrainDtype::Bf16 => Some(FloatDType::BF16),
        }
    }

    /// Whether this is the default (serialised settings leave it out, so their hashes stay put).
    pub fn is_f32(&self) -> bool {
        *self == TrainDtype::F32
    }
}

/// `module` with every float parameter cast to `dtype` (a parameter already in it is kept).
/// On an autodiff device the cast is part of the graph: a loss computed on the copy has
/// gradients for the original parameters, cast back to their dtype.
pub fn cast_params<M: Module>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            param.map(|tensor| tensor.cast(dtype))
        }
    }
    module.map(&mut Cast(dtype))
}

/// Every float parameter's values by dotted path (LoRA factors end in `.lora.a` / `.lora.b`).
pub fn parameter_values<M: Module>(module: &M) -> std::collections::BTreeMap<String, Vec<f32>> {
    let mut values = std::collections::BTreeMap::new();
    let mut found = Vec::new();
    module.visit(&mut PathVisitor { values: Some(&mut values), ..PathVisitor::new(&mut found) });
    values
}

/// Gradients of every float parameter, gathered by id.
struct GradNorm<'a> {
    grads: &'a GradientsParams,
    sum_of_squares: f64,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            self.sum_of_squares += f64::from(grad.square().sum().into_scalar::<f32>());
        }
    }
}

struct GradScale<'a> {
    grads: &'a mut GradientsParams,
    scale: f32,
}

impl ModuleVisitor for GradScale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, grad * self.scale);
        }
    }
}

/// The global L2 norm of all gradients of `module`'s parameters.
pub fn global_grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut visitor = GradNorm { grads, sum_of_squares: 0.0 };
    module.visit(&mut visitor);
    visitor.sum_of_squares.sqrt()
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by min(1, max_norm / (norm + 1e-6))
/// where norm is the global norm; returns the norm before clipping.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_grad_norm(module, grads);
    let scale = (max_norm / (norm + 1e-6)).min(1.0);
    if scale < 1.0 {
        module.visit(&mut GradScale { grads, scale: scale as f32 });
    }
    norm
}

/// First and second moments of one parameter, flattened.
#[derive(Debug, Clone)]
struct Moments {
    exp_avg: Tensor<1>,
    exp_avg_sq: Tensor<1>,
}

/// AdamW with PyTorch's update: p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), with wd = 0
/// for the parameters [`decays`] leaves out.
#[derive(Debug, Clone)]
pub struct AdamW {
    settings: AdamWSettings,
    /// Optimizer steps taken (PyTorch's per-parameter `step`, shared here since every parameter
    /// is updated at every step).
    steps: u64,
    moments: HashMap<ParamId, Moments>,
}

struct AdamWMapper<'a> {
    optimizer: &'a mut AdamW,
    grads: &'a mut GradientsParams,
    learning_rate: f64,
    /// Parameters without weight decay.
    no_decay: HashSet<ParamId>,
    /// Sum of squared parameter changes of this step, for `update_norm`.
    update_sum_of_squares: f64,
}

impl ModuleMapper for AdamWMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let value = tensor.inner(); // without the autodiff graph
        let shape = value.dims();
        let count: usize = shape.iter().product();
        let grad: Tensor<1> = grad.reshape([count]);
        let AdamWSettings { beta1, beta2, eps, weight_decay } = self.optimizer.settings;
        let moments = match self.optimizer.moments.remove(&id) {
            Some(Moments { exp_avg, exp_avg_sq }) => Moments {
                exp_avg: exp_avg * beta1 as f32 + grad.clone() * (1.0 - beta1) as f32,
                exp_avg_sq: exp_avg_sq * beta2 as f32 + grad.square() * (1.0 - beta2) as f32,
            },
            None => Moments {
                exp_avg: grad.clone() * (1.0 - beta1) as f32,
                exp_avg_sq: grad.square() * (1.0 - beta2) as f32,
            },
        };
        let step = self.optimizer.steps as i32 + 1;
        let bias_correction1 = 1.0 - beta1.powi(step);
        let bias_correction2 = 1.0 - beta2.powi(step);
        let denominator = moments.exp_avg_sq.clone().div_scalar(bias_correction2 as f32).sqrt() + eps as f32;
        let update =
            moments.exp_avg.clone().div_scalar(bias_correction1 as f32) / denominator * self.learning_rate as f32;
        let flat: Tensor<1> = value.reshape([count]);
        let weight_decay = if self.no_decay.contains(&id) { 0.0 } else { weight_decay };
        let new_flat = flat.clone() * (1.0 - self.learning_rate * weight_decay) as f32 - update;
        self.update_sum_of_squares += f64::from((new_flat.clone() - flat).square().sum().into_scalar::<f32>());
        self.optimizer.moments.insert(id, moments);
        let mut updated = Tensor::from_inner(new_flat.reshape(shape));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(settings: AdamWSettings) -> Self {
        Self { settings, steps: 0, moments: HashMap::new() }
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies one update with `grads` at `learning_rate`; returns the updated module and the
    /// L2 norm of the parameter change (`update_norm`).
    pub fn step<M: Module>(&mut self, module: M, mut grads: GradientsParams, learning_rate: f64) -> (M, f64) {
        let no_decay = if self.settings.weight_decay == 0.0 { HashSet::new() } else { no_decay_parameters(&module) };
        let mut mapper =
            AdamWMapper { optimizer: self, grads: &mut grads, learning_rate, no_decay, update_sum_of_squares: 0.0 };
        let module = module.map(&mut mapper);
        let update_norm = mapper.update_sum_of_squares.sqrt();
        self.steps += 1;
        (module, update_norm)
    }

    /// Saves the moments under `{parameter path}.exp_avg` / `.exp_avg_sq`, and the step count.
    pub fn save<M: Module>(&self, module: &M, path: &Path) -> Result<(), LoadError> {
        let mut writer = WeightWriter::default();
        for (name, id) in parameter_paths(module) {
            if let Some(moments) = self.moments.get(&id) {
                writer.tensor(&format!("{name}.exp_avg"), moments.exp_avg.clone());
                writer.tensor(&format!("{name}.exp_avg_sq"), moments.exp_avg_sq.clone());
            }
        }
        writer.tensor(
            "__step__",
            Tensor::<1>::from_data(TensorData::new(vec![self.steps as f32], [1]), &burn::tensor::Device::flex()),
        );
        writer.write(path)
    }

    /// Restores moments saved by [`AdamW::save`] for `module` (matched by parameter path).
    pub fn load<M: Module>(settings: AdamWSettings, module: &M, path: &Path) -> Result<Self, LoadError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let device = module.devices().into_iter().next().unwrap_or_else(burn::tensor::Device::flex).without_autodiff();
        let mut weights = WeightMap::open_files(dir, &[path.to_path_buf()], &device)?;
        let steps = weights.take_values("__step__", &[1])?[0] as u64;
        let mut moments = HashMap::new();
        for (name, id) in parameter_paths(module) {
            let key = format!("{name}.exp_avg");
            if !weights.contains(&key) {
                continue;
            }
            let count = weights.shape(&key).map_or(0, |shape| shape.iter().product::<usize>());
            let exp_avg = weights.tensor(&key, [count])?;
            let exp_avg_sq = weights.tensor(&format!("{name}.exp_avg_sq"), [count])?;
            moments.insert(id, Moments { exp_avg, exp_avg_sq });
        }
        weights.finish()?;
        Ok(Self { settings, steps, moments })
    }
}

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    /// The loss value.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// L2 norm of the parameter change.
    pub update_norm: f64,
}

/// A quantity of an update that was NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NonFinite {
    /// The loss.
    Loss(f64),
    /// The gradient norm.
    GradNorm(f64),
}

impl NonFinite {
    /// The quantity's name, for error messages.
    pub fn quantity(self) -> &'static str {
        match self {
            NonFinite::Loss(_) => "loss",
            NonFinite::GradNorm(_) => "gradient norm",
        }
    }

    /// The offending value.
    pub fn value(self) -> f64 {
        match self {
            NonFinite::Loss(value) | NonFinite::GradNorm(value) => value,
        }
    }
}

/// Rows per shard below which a batch is not split across threads.
pub const MIN_ROWS_PER_SHARD: usize = 2;

/// How [`sharded_backward`] splits `rows` rows: one contiguous range per rayon thread when the
/// model lives on the CPU backend (at least [`MIN_ROWS_PER_SHARD`] rows each), else one range.
pub fn shard_ranges<M: Module>(model: &M, rows: usize) -> Vec<std::ops::Range<usize>> {
    let on_cpu = model.devices().first().is_none_or(|device| *device == burn::tensor::Device::flex());
    let parts = if on_cpu { rayon::current_num_threads().min(rows / MIN_ROWS_PER_SHARD).max(1) } else { 1 };
    let size = rows.div_ceil(parts).max(1);
    (0..rows).step_by(size).map(|start| start..(start + size).min(rows)).collect()
}

/// Gradients of a loss that is a sum over row shards, the shards computed concurrently on the
/// CPU backend (one autodiff graph per rayon thread, the parameters shared).
///
/// A small model's ops are too fine-grained to keep several cores busy on their own (flex ran a
/// training step as fast on one thread as on two); data parallelism over rows does. `shard_loss`
/// gets the model and a row range and returns that shard's *share* of the loss (normalised by
/// whole-batch totals, so the shares add up to the batch loss) and any per-shard statistics.
/// Returns the loss, the summed gradients and the statistics in row order; a shard whose loss is
/// not finite skips its backward pass and the call reports it (no gradients are returned).
/// With a `working` dtype each shard computes on a copy of the parameters cast to it, and the
/// gradients come back in the parameters' own dtype (see [`TrainDtype`]).
pub fn sharded_backward<M, T, F>(
    model: &M,
    rows: usize,
    working: Option<FloatDType>,
    shard_loss: F,
) -> Result<(f64, GradientsParams, Vec<T>), NonFinite>
where
    M: Module + Sync,
    T: Send,
    F: Fn(&M, std::ops::Range<usize>) -> (Tensor<1>, T) + Sync,
{
    use rayon::prelude::*;
    let ranges = shard_ranges(model, rows);
    let parallel = ranges.len() > 1;
    let shard = |range: std::ops::Range<usize>| {
        // Each shard differentiates its own leaves (same parameter ids and values): burn's
        // autodiff merges graphs that share a leaf under one lock, which would run the
        // shards' backward passes one after the other.
        let local = parallel.then(|| model.clone().map(&mut FreshLeaves));
        let local = local.as_ref().unwrap_or(model);
        let (loss, extra) = match working {
            Some(dtype) => shard_loss(&cast_params(local.clone(), dtype), range),
            None => shard_loss(local, range),
        };
        let value = f64::from(loss.clone().into_scalar::<f32>());
        if !value.is_finite() {
            return Err(NonFinite::Loss(value));
        }
        Ok((value, GradientsParams::from_grads(loss.backward(), local), extra))
    };
    let results: Vec<Result<_, NonFinite>> =
        if !parallel { ranges.into_iter().map(shard).collect() } else { ranges.into_par_iter().map(shard).collect() };
    let mut accumulator = burn::optim::GradientsAccumulator::new();
    let mut total = 0.0;
    let mut extras = Vec::with_capacity(results.len());
    for result in results {
        let (value, grads, extra) = result?;
        total += value;
        accumulator.accumulate(model, grads);
        extras.push(extra);
    }
    Ok((total, accumulator.grads(), extras))
}

/// Rows per micro-batch of an update over `rows` rows, the tokens of rows `range` counted by
/// `tokens` (padded, or with a shared prompt counted once per forward pass that runs it): `steps`
/// micro-batches of equal size when set, else the fewest micro-batches, of equal row counts,
/// whose every one fits `max_tokens` (a micro-batch of one row always does). A backward pass
/// holds activations in proportion to its tokens, so the budget bounds a step's memory.
pub fn micro_batch_rows_by(
    rows: usize,
    steps: Option<usize>,
    max_tokens: usize,
    tokens: impl Fn(std::ops::Range<usize>) -> usize,
) -> usize {
    if let Some(steps) = steps {
        return rows.div_ceil(steps.clamp(1, rows.max(1))).max(1);
    }
    let fits = |size: usize| (0..rows).step_by(size).all(|start| tokens(start..(start + size).min(rows)) <= max_tokens);
    (1..=rows).map(|count| rows.div_ceil(count)).find(|&size| size == 1 || fits(size)).unwrap_or(1)
}

/// Replaces every trained parameter by a new autodiff leaf over the same values and id.
struct FreshLeaves;

impl ModuleMapper for FreshLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.is_require_grad() {
            return param;
        }
        param.map(|tensor| tensor.detach().require_grad())
    }
}

/// Clips `grads` by the global norm (when `max_grad_norm` is set), checks the norm and steps
/// AdamW; for gradients accumulated over micro-batches. `loss` is only reported.
pub fn apply_gradients<M: Module>(
    model: M,
    mut grads: GradientsParams,
    loss: f64,
    optimizer: &mut AdamW,
    max_grad_norm: Option<f64>,
    learning_rate: f64,
) -> Result<(M, UpdateStats), (M, NonFinite)> {
    let grad_norm = match max_grad_norm {
        Some(max_norm) => clip_grad_norm(&model, &mut grads, max_norm),
        None => global_grad_norm(&model, &grads),
    };
    if !grad_norm.is_finite() {
        return Err((model, NonFinite::GradNorm(grad_norm)));
    }
    let (model, update_norm) = optimizer.step(model, grads, learning_rate);
    Ok((model, UpdateStats { loss, grad_norm, update_norm }))
}

/// A model under training and its optimizer: the one update path of every trainer (SFT, the
/// reward model, GRPO, PPO, RLOO). [`Self::backward`] differentiates a sharded loss on the model
/// in place; [`Self::update`] clips, checks and steps AdamW. burn's optimizer takes the module by
/// value, so the model leaves its slot only inside `update`, and goes back on every path: a
/// step that fails (a NaN gradient norm) leaves the trainer holding its model.
pub struct Updater<M> {
    model: Option<M>,
    optimizer: AdamW,
    /// The dtype of the passes' working copy (see [`TrainDtype`]).
    working: Option<FloatDType>,
}

impl<M: Module + Sync> Updater<M> {
    /// Trains `model` (on an autodiff device) with `optimizer`.
    pub fn new(model: M, optimizer: AdamW) -> Self {
        Self { model: Some(model), optimizer, working: None }
    }

    /// Computes in `dtype` over the model's own parameters, the master weights (see [`TrainDtype`]).
    pub fn with_dtype(mut self, dtype: TrainDtype) -> Self {
        self.working = dtype.working();
        self
    }

    /// A copy of the model for passes without gradients (sampling, scoring), in the dtype the
    /// training passes compute in.
    pub fn inference(&self) -> M {
        self.in_working_dtype(self.model().valid())
    }

    /// `module` (a frozen reference, say) cast to the dtype the training passes compute in.
    pub fn in_working_dtype<N: Module>(&self, module: N) -> N {
        match self.working {
            Some(dtype) => cast_params(module, dtype),
            None => module,
        }
    }

    /// The model.
    pub fn model(&self) -> &M {
        self.model.as_ref().expect("the model is back in place after every update")
    }

    /// The optimizer (its step count, its state for checkpoints).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The model, handed back.
    pub fn into_model(self) -> M {
        self.model.expect("the model is back in place after every update")
    }

    /// Replaces the model by `f(model)` (a module transformation between updates).
    pub fn map_model(&mut self, f: impl FnOnce(M) -> M) {
        let model = self.model.take().expect("the model is back in place after every update");
        self.model = Some(f(model));
    }

    /// [`sharded_backward`] on the model.
    pub fn backward<T, F>(&self, rows: usize, shard_loss: F) -> Result<(f64, GradientsParams, Vec<T>), NonFinite>
    where
        T: Send,
        F: Fn(&M, std::ops::Range<usize>) -> (Tensor<1>, T) + Sync,
    {
        sharded_backward(self.model(), rows, self.working, shard_loss)
    }

    /// [`apply_gradients`] to the model; on a non-finite gradient norm the model is kept as it was.
    pub fn update(
        &mut self,
        grads: GradientsParams,
        loss: f64,
        max_grad_norm: Option<f64>,
        learning_rate: f64,
    ) -> Result<UpdateStats, NonFinite> {
        let model = self.model.take().expect("the model is back in place after every update");
        let (model, outcome) =
            match apply_gradients(model, grads, loss, &mut self.optimizer, max_grad_norm, learning_rate) {
                Ok((model, stats)) => (model, Ok(stats)),
                Err((model, bad)) => (model, Err(bad)),
            };
        self.model = Some(model);
        outcome
    }
}
