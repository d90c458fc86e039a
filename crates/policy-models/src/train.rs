//! Supervised fine-tuning: cross-entropy on completion tokens (the prompt is masked), AdamW,
//! warmup + cosine, global gradient-norm clipping, checkpoints every N steps and exact resume.
//!
//! Batches are drawn from a permutation of the examples seeded by (seed, epoch), so the batch
//! of any step is known without replaying earlier ones: a resumed run sees exactly the batches
//! the uninterrupted run would have seen.
//!
//! Legend: `B` batch, `T` padded sequence length, `V` vocabulary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::layers::StepInput;
use crate::model::CausalLm;
use crate::optim::{AdamW, AdamWSettings, NonFinite, Schedule, TrainDtype, Updater};
use crate::tokenizer::PolicyTokenizer;
use crate::weights::LoadError;

/// One supervised example: the model learns `completion_ids` given `prompt_ids`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftExample {
    /// Context tokens, not trained on.
    pub prompt_ids: Vec<i64>,
    /// Target tokens (end-of-sequence included when the model should learn to stop).
    pub completion_ids: Vec<i64>,
}

impl SftExample {
    /// Tokens the loss averages over: every completion token that has a predecessor.
    pub fn target_tokens(&self) -> usize {
        self.completion_ids.len().min((self.prompt_ids.len() + self.completion_ids.len()).saturating_sub(1))
    }
}

/// Settings of a supervised run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate, warmup and cosine floor (`total_steps` should equal `steps`).
    pub schedule: Schedule,
    /// AdamW settings (PyTorch's defaults unless given).
    pub adamw: AdamWSettings,
    /// Global gradient-norm clip; `None` for no clipping.
    pub max_grad_norm: Option<f64>,
    /// Save a checkpoint every this many steps (0: only when asked).
    pub checkpoint_every: u64,
    /// Seed of the batch order.
    pub seed: u64,
    /// Padding id.
    pub pad_token_id: i64,
    /// The most tokens (rows x padded length) one forward and backward pass holds: a larger
    /// batch is split into micro-batches of equal row counts whose gradients add up (the loss is
    /// normalised by the whole batch's tokens, so the split does not change the step; see
    /// [`crate::optim::micro_batch_rows_by`]). Default 1024, the RL algorithms' budget.
    #[serde(default = "default_max_tokens_per_micro_batch")]
    pub max_tokens_per_micro_batch: usize,
    /// The precision of the training passes: `bf16` computes on a bf16 copy of f32 master
    /// weights ([`crate::optim::TrainDtype`]). Default f32.
    #[serde(default, skip_serializing_if = "TrainDtype::is_f32")]
    pub dtype: TrainDtype,
}

fn default_max_tokens_per_micro_batch() -> usize {
    DEFAULT_MAX_TOKENS_PER_MICRO_BATCH
}

/// The default [`SftConfig::max_tokens_per_micro_batch`].
pub const DEFAULT_MAX_TOKENS_PER_MICRO_BATCH: usize = 1024;

/// What one step did (the names are the metrics the RL algorithms also report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftStep {
    /// Steps completed after this one.
    pub step: u64,
    /// Mean cross-entropy per completion token (nats).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// L2 norm of the parameter change.
    pub update_norm: f64,
    /// Learning rate used.
    pub learning_rate: f64,
    /// Completion tokens trained on.
    pub tokens: usize,
    /// Wall-clock seconds of the step.
    pub step_time: f64,
}

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "step {step}: the {quantity} is {value}; stopping. The last checkpoint (if any) is intact; \
         lower the learning rate or set max_grad_norm"
    )]
    NotFinite { step: u64, quantity: &'static str, value: f64 },

    #[error("no training examples")]
    NoExamples,

    #[error(transparent)]
    Load(#[from] LoadError),

    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}

/// Mean cross-entropy of the completion tokens of `batch`, and how many tokens it averages.
///
/// # Shapes
/// - returns a loss of shape [1]
pub fn sft_loss(model: &CausalLm, batch: &[&SftExample], pad_token_id: i64) -> (Tensor<1>, usize) {
    let tokens = batch.iter().map(|example| example.target_tokens()).sum::<usize>();
    (sft_loss_share(model, batch, pad_token_id, tokens), tokens)
}

/// The summed next-token loss of `batch`'s completion tokens divided by `total_tokens` (the
/// whole batch's count): `batch`'s share of the batch loss when the batch is split into shards.
pub fn sft_loss_share(model: &CausalLm, batch: &[&SftExample], pad_token_id: i64, total_tokens: usize) -> Tensor<1> {
    let length = batch.iter().map(|e| e.prompt_ids.len() + e.completion_ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len());
    let mut mask = Vec::with_capacity(batch.len());
    let mut target_mask = Vec::with_capacity(batch.len() * length);
    for example in batch {
        let real = example.prompt_ids.len() + example.completion_ids.len();
        let mut row = vec![pad_token_id; length - real];
        row.extend_from_slice(&example.prompt_ids);
        row.extend_from_slice(&example.completion_ids);
        // Position t predicts token t + 1: it is trained when token t + 1 is a completion token.
        let first_target = length - example.completion_ids.len();
        // (The first real token has no predecessor: it is never a target, padded or not.)
        target_mask.extend((0..length).map(|t| t + 1 >= first_target && t + 1 < length && t + real >= length));
        mask.push((0..length).map(|t| t >= length - real).collect::<Vec<bool>>());
        ids.push(row);
    }
    let input = StepInput::from_padded(&ids, &mask);
    let hidden = model.hidden_states(&input, &mut model.new_cache()); // [B, T, C]
    let [batch_size, _, width] = hidden.dims();
    // Only the trained positions go through the LM head, fused with the log-softmax and the
    // gather: no [B, T, V] logits (for SmolLM2's 49152 entries, 64 rows of 235 tokens are 3 GB).
    let positions: Vec<i64> = (0..batch_size * length).filter(|&i| target_mask[i]).map(|i| i as i64).collect();
    if positions.is_empty() {
        return hidden.sum().reshape([1]) * 0.0;
    }
    let device = hidden.device();
    let targets: Vec<i64> = positions.iter().map(|&i| ids[i as usize / length][i as usize % length + 1]).collect();
    let count = positions.len();
    let positions = Tensor::<1, Int>::from_data(TensorData::new(positions, [count]), &device);
    let predicting = hidden.reshape([batch_size * length, width]).select(0, positions); // [N, C]
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [count]), &device);
    let (log_probs, _) = model.token_log_probs(predicting, targets, 1.0);
    -log_probs.sum() / total_tokens.max(1) as f32
}

/// A model under supervised training with its optimizer and step count.
pub struct SftTrainer {
    updater: Updater<CausalLm>,
    config: SftConfig,
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    config: SftConfig,
}

impl SftTrainer {
    /// Starts training `model` (which must live on an autodiff device).
    pub fn new(model: CausalLm, config: SftConfig) -> Self {
        Self { updater: Updater::new(model, AdamW::new(config.adamw)).with_dtype(config.dtype), config }
    }

    /// Resumes from a checkpoint directory written by [`SftTrainer::save_checkpoint`], on
    /// `device` (an autodiff device).
    pub fn resume(checkpoint: &Path, config: SftConfig, device: &Device) -> Result<Self, TrainError> {
        let adapter = checkpoint.join(crate::lora::ADAPTER_SUBDIR);
        if adapter.join(crate::lora::ADAPTER_CONFIG_FILE).is_file() {
            return Err(TrainError::Checkpoint {
                path: adapter,
                message: "a LoRA run's checkpoint (its model.safetensors holds merged weights, which would resume as full fine-tuning); \
                          resume with SftTrainer::resume_lora and the starting model with the same adapters attached"
                    .to_string(),
            });
        }
        Self::resume_model(CausalLm::load_dir(checkpoint, device)?, checkpoint, config)
    }

    /// Resumes a LoRA run: `start` is the run's starting model with its adapters attached
    /// ([`CausalLm::with_lora`], same settings); the checkpoint's adapters are loaded into it,
    /// so the base stays frozen and the optimizer state matches the adapters it belongs to.
    pub fn resume_lora(start: CausalLm, checkpoint: &Path, config: SftConfig) -> Result<Self, TrainError> {
        let model = start.load_adapters(&checkpoint.join(crate::lora::ADAPTER_SUBDIR))?;
        Self::resume_model(model, checkpoint, config)
    }

    fn resume_model(model: CausalLm, checkpoint: &Path, config: SftConfig) -> Result<Self, TrainError> {
        let optimizer = AdamW::load(config.adamw, &model, &checkpoint.join("optimizer.safetensors"))?;
        let state_path = checkpoint.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path)
            .map_err(|error| TrainError::Checkpoint { path: state_path.clone(), message: error.to_string() })?;
        let state: TrainerState = serde_json::from_str(&text)
            .map_err(|error| TrainError::Checkpoint { path: state_path.clone(), message: error.to_string() })?;
        if state.step != optimizer.steps() {
            return Err(TrainError::Checkpoint {
                path: state_path,
                message: format!(
                    "trainer step {} but optimizer step {}: a partial checkpoint",
                    state.step,
                    optimizer.steps()
                ),
            });
        }
        Ok(Self { updater: Updater::new(model, optimizer).with_dtype(config.dtype), config })
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.updater.optimizer().steps()
    }

    /// The model.
    pub fn model(&self) -> &CausalLm {
        self.updater.model()
    }

    /// Hands the model back.
    pub fn into_model(self) -> CausalLm {
        self.updater.into_model()
    }

    /// The examples of step `step`: consecutive slices of a per-epoch permutation.
    fn batch_indices(&self, step: u64, count: usize) -> Vec<usize> {
        let batch_size = self.config.batch_size;
        let start = step as usize * batch_size;
        let mut permutation: Option<(usize, Vec<usize>)> = None;
        (start..start + batch_size)
            .map(|position| {
                let epoch = position / count;
                if permutation.as_ref().is_none_or(|(cached, _)| *cached != epoch) {
                    let mut order: Vec<usize> = (0..count).collect();
                    let seed = self.config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
                    permutation = Some((epoch, order));
                }
                permutation.as_ref().expect("just filled").1[position % count]
            })
            .collect()
    }

    /// One optimizer step on the next batch of `examples`.
    pub fn train_step(&mut self, examples: &[SftExample]) -> Result<SftStep, TrainError> {
        if examples.is_empty() {
            return Err(TrainError::NoExamples);
        }
        let started = Instant::now();
        let step = self.updater.optimizer().steps();
        let batch: Vec<&SftExample> =
            self.batch_indices(step, examples.len()).into_iter().map(|i| &examples[i]).collect();
        let tokens = batch.iter().map(|example| example.target_tokens()).sum::<usize>();
        let pad = self.config.pad_token_id;
        let learning_rate = self.config.schedule.learning_rate_at(step);
        // One shard of rows per thread on the CPU: see `sharded_backward`.
        let not_finite =
            |bad: NonFinite| TrainError::NotFinite { step: step + 1, quantity: bad.quantity(), value: bad.value() };
        let padded = |rows: std::ops::Range<usize>| {
            let longest = batch[rows.clone()].iter().map(|e| e.prompt_ids.len() + e.completion_ids.len()).max();
            longest.unwrap_or(0) * rows.len()
        };
        let micro =
            crate::optim::micro_batch_rows_by(batch.len(), None, self.config.max_tokens_per_micro_batch, padded);
        let (mut loss, mut accumulator) = (0.0, burn::optim::GradientsAccumulator::new());
        for micro_batch in batch.chunks(micro) {
            let (share, grads, _) = self
                .updater
                .backward(micro_batch.len(), |model, rows| (sft_loss_share(model, &micro_batch[rows], pad, tokens), ()))
                .map_err(not_finite)?;
            loss += share;
            accumulator.accumulate(self.updater.model(), grads);
        }
        let grads = accumulator.grads();
        let stats = self.updater.update(grads, loss, self.config.max_grad_norm, learning_rate).map_err(not_finite)?;
        Ok(SftStep {
            step: step + 1,
            loss: stats.loss,
            grad_norm: stats.grad_norm,
            update_norm: stats.update_norm,
            learning_rate,
            tokens,
            step_time: started.elapsed().as_secs_f64(),
        })
    }

    /// Writes `dir/checkpoint-{step}/` (model in the HF layout, tokenizer, optimizer state,
    /// trainer state) through a temporary directory and a rename, so a crash never leaves a
    /// half-written checkpoint under the final name. Returns its path.
    pub fn save_checkpoint(&self, dir: &Path, tokenizer: Option<&PolicyTokenizer>) -> Result<PathBuf, TrainError> {
        let step = self.step();
        let final_dir = dir.join(format!("checkpoint-{step}"));
        let temporary = dir.join(format!(".checkpoint-{step}.tmp"));
        let fail = |path: &Path, error: std::io::Error| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: error.to_string(),
        };
        if temporary.exists() {
            std::fs::remove_dir_all(&temporary).map_err(|error| fail(&temporary, error))?;
        }
        self.model().save_dir(&temporary, tokenizer)?;
        self.updater.optimizer().save(self.model(), &temporary.join("optimizer.safetensors"))?;
        let state = TrainerState { step, config: self.config.clone() };
        let state_path = temporary.join("trainer_state.json");
        std::fs::write(&state_path, serde_json::to_string_pretty(&state).expect("json"))
            .map_err(|error| fail(&state_path, error))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|error| fail(&final_dir, error))?;
        }
        std::fs::rename(&temporary, &final_dir).map_err(|error| fail(&final_dir, error))?;
        Ok(final_dir)
    }

    /// The newest `checkpoint-{step}` directory under `dir`, if any.
    pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
                Some((step, entry.path()))
            })
            .max_by_key(|(step, _)| *step)
            .map(|(_, path)| path)
    }

    /// Runs the remaining steps, saving checkpoints every `checkpoint_every` steps under
    /// `checkpoint_dir` and calling `on_step` after each.
    pub fn run(
        &mut self,
        examples: &[SftExample],
        checkpoint_dir: Option<&Path>,
        tokenizer: Option<&PolicyTokenizer>,
        mut on_step: impl FnMut(&SftStep),
    ) -> Result<Vec<SftStep>, TrainError> {
        let mut history = Vec::new();
        while self.step() < self.config.steps {
            let record = self.train_step(examples)?;
            on_step(&record);
            if let Some(dir) = checkpoint_dir {
                let every = self.config.checkpoint_every;
                if (every > 0 && record.step % every == 0) || record.step == self.config.steps {
                    self.save_checkpoint(dir, tokenizer)?;
                }
            }
            history.push(record);
        }
        Ok(history)
    }
}
