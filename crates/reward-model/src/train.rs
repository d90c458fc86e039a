//! Reward-model training on comparisons: the pairwise Bradley-Terry loss
//! -log sigmoid(r_chosen - r_rejected) by default, or MSE regression on scalar labels (chosen 1,
//! rejected 0: the GPT-Neo seed's criterion); AdamW with PyTorch's semantics, warmup + cosine,
//! global gradient clipping, checkpoints and exact resume. Metrics: loss, pairwise accuracy,
//! mean score margin. One trainer serves both models through [`RewardModel`].

use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Tensor, TensorData};
use policy_models::PolicyTokenizer;
use policy_models::optim::{AdamW, AdamWSettings, NonFinite, Schedule, Updater};
use policy_models::weights::LoadError;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::causal::CausalRewardModel;
use crate::comparisons::Comparison;
use crate::likelihood::LikelihoodRewardModel;
use crate::roberta::RobertaRegressor;

/// Rows of (prompt, completion) text as a reward model reads them, right-padded to one length
/// ([`RewardTokenizer::batch`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RewardRows {
    /// Token ids, [B][T].
    pub ids: Vec<Vec<i64>>,
    /// True on real tokens, [B][T].
    pub mask: Vec<Vec<bool>>,
    /// Per row, the position of the completion's first token (after any cut; at least 1, and
    /// the row's length when the completion has no tokens), [B].
    pub completion_start: Vec<usize>,
    /// True on the tokens of a rejected completion's error, [B][T]: the labels of
    /// [`RewardTrainingConfig::token_loss_weight`].
    pub labels: Vec<Vec<bool>>,
}

impl RewardRows {
    /// Real tokens per row (rows are right-padded: positions 0..length).
    pub fn lengths(&self) -> Vec<usize> {
        self.mask.iter().map(|row| row.iter().filter(|&&real| real).count()).collect()
    }
}

/// How a (prompt, completion) pair becomes one row of tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLayout {
    /// `<bos> prompt \n completion <eos>`, kept from the end when too long: a sequence
    /// classifier's input (the RoBERTa regressor, the score head on the last token).
    Classifier,
    /// The prompt as the policy read it (the tokenizer's own BOS first, where it puts one; a
    /// chat-rendered prompt holds its special tokens already), then the completion's tokens, with
    /// no separator or end token: the sequence whose likelihood the policy gave. Too long, the
    /// prompt loses its start (after the BOS) first.
    Continuation,
}

/// What the trainer, the evaluation and the reward function need of a reward model: scores of
/// padded rows, through the final hidden states (which the token loss also reads).
pub trait RewardModel: burn::module::Module + Sync + Sized {
    /// The rows this model reads ([`RewardTokenizer::with_layout`]).
    fn layout(&self) -> RowLayout {
        RowLayout::Classifier
    }

    /// Final hidden states of the rows.
    ///
    /// # Shapes
    /// - `rows`: [B][T] → [B, T, C]
    fn encode(&self, rows: &RewardRows) -> Tensor<3>;

    /// The score of each row from [`RewardModel::encode`]'s hidden states.
    ///
    /// # Shapes
    /// - `hidden`: [B, T, C], `rows`: [B][T] → [B]
    fn score_hidden(&self, hidden: Tensor<3>, rows: &RewardRows) -> Tensor<1>;

    /// Scores of the rows.
    ///
    /// # Shapes
    /// - `rows`: [B][T] → [B]
    fn score_rows(&self, rows: &RewardRows) -> Tensor<1> {
        self.score_hidden(self.encode(rows), rows)
    }

    /// Per-token error logits for [`RewardTrainingConfig::token_loss_weight`], when the model
    /// has a token head.
    fn token_logits(&self, _hidden: Tensor<3>) -> Option<Tensor<2>> {
        None
    }

    /// The model with a token head, for the token loss; an error when it cannot have one.
    fn with_token_head(self) -> Result<Self, String> {
        Err("token_loss_weight > 0 needs a token head, which only the RoBERTa regressor has; set token_loss_weight = 0"
            .to_string())
    }

    /// Saves the model in its Hugging Face layout.
    fn save_dir(&self, dir: &Path) -> Result<(), LoadError>;
}

impl RewardModel for RobertaRegressor {
    fn encode(&self, rows: &RewardRows) -> Tensor<3> {
        RobertaRegressor::encode(self, &rows.ids, &rows.mask)
    }
    fn score_hidden(&self, hidden: Tensor<3>, _rows: &RewardRows) -> Tensor<1> {
        RobertaRegressor::score_hidden(self, hidden)
    }
    fn token_logits(&self, hidden: Tensor<3>) -> Option<Tensor<2>> {
        RobertaRegressor::token_logits(self, hidden)
    }
    fn with_token_head(self) -> Result<Self, String> {
        Ok(RobertaRegressor::with_token_head(self))
    }
    fn save_dir(&self, dir: &Path) -> Result<(), LoadError> {
        RobertaRegressor::save_dir(self, dir)
    }
}

impl RewardModel for CausalRewardModel {
    fn encode(&self, rows: &RewardRows) -> Tensor<3> {
        CausalRewardModel::encode(self, &rows.ids, &rows.mask)
    }
    fn score_hidden(&self, hidden: Tensor<3>, rows: &RewardRows) -> Tensor<1> {
        CausalRewardModel::score_hidden(self, hidden, &rows.ids)
    }
    fn save_dir(&self, dir: &Path) -> Result<(), LoadError> {
        CausalRewardModel::save_dir(self, dir)
    }
}

impl RewardModel for LikelihoodRewardModel {
    fn layout(&self) -> RowLayout {
        RowLayout::Continuation
    }
    fn encode(&self, rows: &RewardRows) -> Tensor<3> {
        LikelihoodRewardModel::encode(self, &rows.ids, &rows.mask)
    }
    fn score_hidden(&self, hidden: Tensor<3>, rows: &RewardRows) -> Tensor<1> {
        LikelihoodRewardModel::score_hidden(self, hidden, &rows.ids, &rows.completion_start, &rows.lengths())
    }
    fn save_dir(&self, dir: &Path) -> Result<(), LoadError> {
        LikelihoodRewardModel::save_dir(self, dir)
    }
}

/// Turns (prompt, completion) text into a reward model's rows ([`RowLayout`]).
#[derive(Debug, Clone)]
pub struct RewardTokenizer {
    tokenizer: PolicyTokenizer,
    layout: RowLayout,
    cls_id: i64,
    sep_id: i64,
    pad_id: i64,
    max_len: usize,
}

impl RewardTokenizer {
    /// Rows in the [`RowLayout::Classifier`] layout: `tokenizer`'s beginning-of-sequence token
    /// (else its end-of-sequence token) first, its end-of-sequence token last, padded with its
    /// padding token.
    pub fn new(tokenizer: PolicyTokenizer, max_len: usize) -> Self {
        let sep_id = i64::from(tokenizer.eos_ids.first().copied().unwrap_or(0));
        let cls_id = tokenizer.bos_id.map_or(sep_id, i64::from);
        let pad_id = tokenizer.pad_id.map_or(sep_id, i64::from);
        Self { tokenizer, layout: RowLayout::Classifier, cls_id, sep_id, pad_id, max_len: max_len.max(3) }
    }

    /// The same tokenizer making rows in `layout`.
    pub fn with_layout(self, layout: RowLayout) -> Self {
        Self { layout, ..self }
    }

    /// The layout of the rows.
    pub fn layout(&self) -> RowLayout {
        self.layout
    }

    /// The padding id (the model's `pad_token_id` must equal it).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The text tokenizer.
    pub fn tokenizer(&self) -> &PolicyTokenizer {
        &self.tokenizer
    }

    /// Token ids of one text pair.
    pub fn encode(&self, prompt: &str, completion: &str) -> Vec<i64> {
        self.encode_labelled(prompt, completion, None).0
    }

    /// Token ids of one text pair, per token whether it overlaps `error` (bytes of
    /// `completion`: the token-level labels of [`RewardTrainingConfig::token_loss_weight`]), and
    /// the position of the completion's first token.
    pub fn encode_labelled(
        &self,
        prompt: &str,
        completion: &str,
        error: Option<&Range<usize>>,
    ) -> (Vec<i64>, Vec<bool>, usize) {
        // Ids of `text`, and per token whether it overlaps `error` shifted by `shift` bytes.
        let tokens = |text: &str, shift: usize| -> Vec<(i64, bool, usize)> {
            match self.tokenizer.inner().encode(text, false) {
                Ok(encoding) => encoding
                    .get_ids()
                    .iter()
                    .zip(encoding.get_offsets())
                    .map(|(&id, &(start, end))| {
                        (i64::from(id), error.is_some_and(|e| start < e.end + shift && end > e.start + shift), end)
                    })
                    .collect(),
                Err(_) => Vec::new(),
            }
        };
        match self.layout {
            RowLayout::Classifier => {
                let shift = prompt.len() + 1;
                let body = tokens(&format!("{prompt}\n{completion}"), shift);
                // The completion starts at the first token holding any of its bytes.
                let start = body.iter().position(|&(_, _, end)| end > shift).unwrap_or(body.len());
                let kept = body.len().saturating_sub(self.max_len - 2);
                let ids = [&[self.cls_id][..], &body[kept..].iter().map(|t| t.0).collect::<Vec<_>>(), &[self.sep_id]]
                    .concat();
                let labels = [&[false][..], &body[kept..].iter().map(|t| t.1).collect::<Vec<_>>(), &[false]].concat();
                let start = (start.saturating_sub(kept) + 1).min(ids.len() - 1);
                (ids, labels, start)
            }
            RowLayout::Continuation => {
                let bos = self.tokenizer.prepended_bos().map(i64::from);
                let mut ids: Vec<i64> = tokens(prompt, 0).into_iter().map(|t| t.0).collect();
                if let Some(bos) = bos.filter(|&bos| ids.first() != Some(&bos)) {
                    ids.insert(0, bos);
                }
                let mut start = ids.len();
                let mut labels = vec![false; start];
                for (id, label, _) in tokens(completion, 0) {
                    ids.push(id);
                    labels.push(label);
                }
                if ids.len() > self.max_len {
                    // Cut after a leading BOS: every sequence the model read started with it.
                    let first = usize::from(bos.is_some() && ids.first().copied() == bos);
                    let cut = ids.len() - self.max_len;
                    ids.drain(first..first + cut);
                    labels.drain(first..first + cut);
                    start = start.saturating_sub(cut).max(first);
                }
                // The first token has nothing before it to be predicted from.
                let start = start.max(1).min(ids.len());
                (ids, labels, start)
            }
        }
    }

    /// Right-padded rows of several pairs.
    pub fn batch(&self, pairs: &[(&str, &str)]) -> RewardRows {
        self.batch_labelled(&pairs.iter().map(|&(prompt, completion)| (prompt, completion, None)).collect::<Vec<_>>())
    }

    /// Right-padded rows of several pairs, with the token labels of
    /// [`RewardTokenizer::encode_labelled`].
    pub fn batch_labelled(&self, pairs: &[(&str, &str, Option<&Range<usize>>)]) -> RewardRows {
        let encoded: Vec<(Vec<i64>, Vec<bool>, usize)> =
            pairs.iter().map(|&(prompt, completion, error)| self.encode_labelled(prompt, completion, error)).collect();
        let width = encoded.iter().map(|(ids, _, _)| ids.len()).max().unwrap_or(0);
        let mut rows = RewardRows::default();
        for (mut ids, mut labels, start) in encoded {
            rows.mask.push((0..width).map(|i| i < ids.len()).collect());
            ids.resize(width, self.pad_id);
            labels.resize(width, false);
            rows.ids.push(ids);
            rows.labels.push(labels);
            rows.completion_start.push(start);
        }
        rows
    }
}

/// The training criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairwiseLoss {
    /// -log sigmoid(r_chosen - r_rejected) (Bradley-Terry; InstructGPT's reward model).
    BradleyTerry,
    /// (r_chosen - 1)^2 + (r_rejected - 0)^2, halved (regression on labels; the GPT-Neo seed).
    Mse,
}

/// Settings of reward-model training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardTrainingConfig {
    /// Optimizer steps. Default 300.
    pub steps: u64,
    /// Pairs per step. Default 16.
    pub batch_size: usize,
    /// Criterion. Default Bradley-Terry.
    pub loss: PairwiseLoss,
    /// Peak learning rate. Default 1e-3 (tiny models; ~1e-5 for DistilRoBERTa).
    pub learning_rate: f64,
    /// Warmup steps. Default 20.
    pub warmup_steps: u64,
    /// Cosine floor as a fraction of the peak. Default 0.1.
    pub min_lr_ratio: f64,
    /// AdamW settings.
    pub adamw: AdamWSettings,
    /// Global gradient-norm clip. Default 1.0.
    pub max_grad_norm: Option<f64>,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Weight of an auxiliary token-level loss (0: off, the default): a linear head on each
    /// token's final hidden state is trained with binary cross-entropy to mark the tokens of the
    /// wrong number in a rejected completion (a corrupted step's result, a wrong final answer;
    /// [`Comparison::rejected_error`]) and nothing elsewhere, averaged over each sequence's
    /// tokens: process supervision's step labels at token level, where the pairwise loss says
    /// only which completion is worse. Experimental: held-out wrong-answer accuracy after 1,000
    /// steps of 32 pairs (`cargo xtask reward-model --token-loss-weight 1`) was 52-66% over three
    /// seeds against about 60% without it; a PyTorch probe on the same pairs gave 53-81%
    /// depending on the initial weights (`research/reward_model_probe_tokens.py`). The
    /// head is dropped from the saved model
    /// ([`RobertaRegressor::without_token_head`]).
    pub token_loss_weight: f64,
    /// Seed of the pair order.
    pub seed: u64,
}

impl Default for RewardTrainingConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            batch_size: 16,
            loss: PairwiseLoss::BradleyTerry,
            learning_rate: 1e-3,
            warmup_steps: 20,
            min_lr_ratio: 0.1,
            adamw: AdamWSettings::default(),
            max_grad_norm: Some(1.0),
            checkpoint_every: 0,
            token_loss_weight: 0.0,
            seed: 0,
        }
    }
}

/// Pairwise accuracy and mean margin of a model on pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairMetrics {
    /// Share of pairs where chosen scores above rejected.
    pub accuracy: f64,
    /// Mean of r_chosen - r_rejected.
    pub mean_margin: f64,
    /// Number of pairs.
    pub pairs: usize,
}

impl PairMetrics {
    /// The metrics of pairs scored `[chosen, rejected]` ([`pair_scores`]); a tie counts as wrong.
    pub fn of_scores(scores: &[[f32; 2]]) -> PairMetrics {
        let correct = scores.iter().filter(|[c, r]| c > r).count();
        let margin_sum: f64 = scores.iter().map(|[c, r]| f64::from(c - r)).sum();
        PairMetrics {
            accuracy: correct as f64 / scores.len().max(1) as f64,
            mean_margin: margin_sum / scores.len().max(1) as f64,
            pairs: scores.len(),
        }
    }

    /// The metrics of the union of disjoint pair sets, from each set's metrics.
    pub fn pooled(parts: &[PairMetrics]) -> PairMetrics {
        let pairs: usize = parts.iter().map(|part| part.pairs).sum();
        let weighted = |value: fn(&PairMetrics) -> f64| {
            parts.iter().map(|part| value(part) * part.pairs as f64).sum::<f64>() / pairs.max(1) as f64
        };
        PairMetrics { accuracy: weighted(|part| part.accuracy), mean_margin: weighted(|part| part.mean_margin), pairs }
    }
}

/// Scores chosen and rejected of `pairs` in batches of `batch_size`.
pub fn evaluate<M: RewardModel>(
    model: &M,
    tokenizer: &RewardTokenizer,
    pairs: &[Comparison],
    batch_size: usize,
) -> PairMetrics {
    PairMetrics::of_scores(&pair_scores(model, tokenizer, pairs, batch_size))
}

/// `[score of chosen, score of rejected]` of each pair, scored in batches of `batch_size` pairs.
pub fn pair_scores<M: RewardModel>(
    model: &M,
    tokenizer: &RewardTokenizer,
    pairs: &[Comparison],
    batch_size: usize,
) -> Vec<[f32; 2]> {
    // Without autodiff: a forward on the training model records its graph, and 128 rows of a
    // 30-layer model kept every activation for a backward pass that never comes (SmolLM2's
    // held-out evaluation went past 24 GB).
    let model = model.valid();
    assert_eq!(tokenizer.layout(), model.layout(), "the tokenizer must make the rows the reward model reads");
    let mut scores = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let (chosen, rejected) = score_pairs(&model, tokenizer, chunk);
        let chosen = chosen.into_data().try_to_vec::<f32>().expect("f32");
        let rejected = rejected.into_data().try_to_vec::<f32>().expect("f32");
        scores.extend(chosen.into_iter().zip(rejected).map(|(c, r)| [c, r]));
    }
    scores
}

/// [`evaluate`] per kind of corruption (the kinds present in `pairs`, in order of appearance):
/// which spoiled answers the model tells apart and which it does not. [`PairMetrics::pooled`]
/// of the parts gives the figures over all pairs without scoring them again.
pub fn evaluate_by_corruption<M: RewardModel>(
    model: &M,
    tokenizer: &RewardTokenizer,
    pairs: &[Comparison],
    batch_size: usize,
) -> Vec<(crate::comparisons::Corruption, PairMetrics)> {
    metrics_by_corruption(pairs, &pair_scores(model, tokenizer, pairs, batch_size))
}

/// The metrics of `pairs` scored `scores` ([`pair_scores`], in the same order) per kind of
/// corruption, the kinds in order of first appearance.
pub fn metrics_by_corruption(
    pairs: &[Comparison],
    scores: &[[f32; 2]],
) -> Vec<(crate::comparisons::Corruption, PairMetrics)> {
    assert_eq!(pairs.len(), scores.len(), "one score pair per comparison");
    let mut kinds = Vec::new();
    for pair in pairs {
        if !kinds.contains(&pair.corruption) {
            kinds.push(pair.corruption);
        }
    }
    kinds
        .into_iter()
        .map(|kind| {
            let of_kind: Vec<[f32; 2]> =
                pairs.iter().zip(scores).filter(|(pair, _)| pair.corruption == kind).map(|(_, score)| *score).collect();
            (kind, PairMetrics::of_scores(&of_kind))
        })
        .collect()
}

/// Scores of the chosen and rejected completions, [B] each.
fn score_pairs<M: RewardModel>(model: &M, tokenizer: &RewardTokenizer, pairs: &[Comparison]) -> (Tensor<1>, Tensor<1>) {
    let texts: Vec<(&str, &str)> = pairs
        .iter()
        .flat_map(|pair| [(pair.prompt.as_str(), pair.chosen.as_str()), (pair.prompt.as_str(), pair.rejected.as_str())])
        .collect();
    split_pairs(model.score_rows(&tokenizer.batch(&texts)), pairs.len())
}

/// Scores of interleaved (chosen, rejected) rows [2B] split into chosen [B] and rejected [B].
fn split_pairs(scores: Tensor<1>, count: usize) -> (Tensor<1>, Tensor<1>) {
    let scores = scores.reshape([count, 2]);
    (scores.clone().slice([0..count, 0..1]).reshape([count]), scores.slice([0..count, 1..2]).reshape([count]))
}

/// Σ over rows of the mean binary cross-entropy of each row's real tokens: `logits` [R, T],
/// `labels` true on error tokens, `masks` true on real tokens.
fn token_loss(logits: Tensor<2>, labels: &[Vec<bool>], masks: &[Vec<bool>]) -> Tensor<1> {
    let device = logits.device();
    let [rows, length] = logits.dims();
    let table = |values: &[Vec<bool>], per_row: &dyn Fn(usize) -> f32| {
        let flat: Vec<f32> = values
            .iter()
            .enumerate()
            .flat_map(|(r, row)| row.iter().map(move |&v| if v { per_row(r) } else { 0.0 }))
            .collect();
        Tensor::<2>::from_data(TensorData::new(flat, [rows, length]), &device)
    };
    let counts: Vec<f32> = masks.iter().map(|row| row.iter().filter(|&&m| m).count().max(1) as f32).collect();
    let labels = table(labels, &|_| 1.0);
    // Each real token weighs 1 / (its row's real tokens).
    let weights = table(masks, &|r| 1.0 / counts[r]);
    let per_token = -(labels.clone() * log_sigmoid(logits.clone()) + (labels.neg() + 1.0) * log_sigmoid(logits.neg()));
    (per_token * weights).sum()
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardStep {
    /// Steps completed.
    pub step: u64,
    /// The batch loss.
    pub loss: f64,
    /// Pairwise accuracy on the batch.
    pub accuracy: f64,
    /// Mean margin on the batch.
    pub mean_margin: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub learning_rate: f64,
}

/// Errors of reward-model training.
#[derive(Debug, thiserror::Error)]
pub enum RewardTrainError {
    #[error(
        "step {step}: the {quantity} is {value}; stopping with the last checkpoint intact. Lower the learning rate"
    )]
    NotFinite { step: u64, quantity: &'static str, value: f64 },
    #[error("no comparison pairs to train on")]
    NoPairs,
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Config(String),
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
}

/// A reward model under training.
pub struct RewardTrainer<M: RewardModel = RobertaRegressor> {
    updater: Updater<M>,
    config: RewardTrainingConfig,
}

impl RewardTrainer<RobertaRegressor> {
    /// Starts training `model` (on an autodiff device).
    pub fn new(model: RobertaRegressor, config: RewardTrainingConfig) -> Self {
        Self::start(model, config).expect("the RoBERTa regressor takes a token head")
    }

    /// Resumes from a checkpoint written by [`RewardTrainer::save_checkpoint`].
    pub fn resume(
        dir: &Path,
        config: RewardTrainingConfig,
        device: &burn::tensor::Device,
    ) -> Result<Self, RewardTrainError> {
        let (model, _) = RobertaRegressor::load_dir(dir, device)?;
        Self::resume_model(model, dir, config)
    }
}

impl RewardTrainer<CausalRewardModel> {
    /// Resumes a causal reward model's run: `start` is the run's starting model, with the same
    /// LoRA adapters attached when the run had them ([`CausalRewardModel::with_checkpoint`]).
    pub fn resume_causal(
        start: CausalRewardModel,
        dir: &Path,
        config: RewardTrainingConfig,
    ) -> Result<Self, RewardTrainError> {
        Self::resume_model(start.with_checkpoint(dir)?, dir, config)
    }
}

impl RewardTrainer<LikelihoodRewardModel> {
    /// Resumes a likelihood verifier's run: `start` is the run's starting model, with the same
    /// LoRA adapters attached when the run had them ([`LikelihoodRewardModel::with_checkpoint`]).
    pub fn resume_likelihood(
        start: LikelihoodRewardModel,
        dir: &Path,
        config: RewardTrainingConfig,
    ) -> Result<Self, RewardTrainError> {
        Self::resume_model(start.with_checkpoint(dir)?, dir, config)
    }
}

impl<M: RewardModel> RewardTrainer<M> {
    /// Starts training `model` (on an autodiff device); an error when the settings ask for what
    /// the model lacks (a token head).
    pub fn start(model: M, config: RewardTrainingConfig) -> Result<Self, RewardTrainError> {
        let model = if config.token_loss_weight > 0.0 {
            model.with_token_head().map_err(RewardTrainError::Config)?
        } else {
            model
        };
        Ok(Self { updater: Updater::new(model, AdamW::new(config.adamw)), config })
    }

    /// Resumes with `model` holding a checkpoint's weights (written by
    /// [`RewardTrainer::save_checkpoint`]) and the optimizer state and step read from it.
    pub fn resume_model(model: M, dir: &Path, config: RewardTrainingConfig) -> Result<Self, RewardTrainError> {
        let optimizer = AdamW::load(config.adamw, &model, &dir.join("optimizer.safetensors"))?;
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path)
            .map_err(|error| RewardTrainError::Checkpoint { path: state_path.clone(), message: error.to_string() })?;
        let state: TrainerState = serde_json::from_str(&text)
            .map_err(|error| RewardTrainError::Checkpoint { path: state_path.clone(), message: error.to_string() })?;
        if state.step != optimizer.steps() {
            return Err(RewardTrainError::Checkpoint {
                path: state_path,
                message: format!(
                    "trainer step {} but optimizer step {}: a partial checkpoint",
                    state.step,
                    optimizer.steps()
                ),
            });
        }
        Ok(Self { updater: Updater::new(model, optimizer), config })
    }

    /// The training settings.
    pub fn config(&self) -> &RewardTrainingConfig {
        &self.config
    }

    /// The model.
    pub fn model(&self) -> &M {
        self.updater.model()
    }

    /// Hands the model back.
    pub fn into_model(self) -> M {
        self.updater.into_model()
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.updater.optimizer().steps()
    }

    /// One optimizer step on the next batch of `pairs` (per-epoch permutations seeded by
    /// (seed, epoch), so a resumed run sees the same batches).
    pub fn train_step(
        &mut self,
        pairs: &[Comparison],
        tokenizer: &RewardTokenizer,
    ) -> Result<RewardStep, RewardTrainError> {
        if pairs.is_empty() {
            return Err(RewardTrainError::NoPairs);
        }
        if tokenizer.layout() != self.model().layout() {
            return Err(RewardTrainError::Config(format!(
                "the reward model reads {:?} rows but the tokenizer makes {:?} rows",
                self.model().layout(),
                tokenizer.layout()
            )));
        }
        let step = self.updater.optimizer().steps();
        let start = step as usize * self.config.batch_size;
        let mut permutation: Option<(usize, Vec<usize>)> = None;
        let batch: Vec<Comparison> = (start..start + self.config.batch_size)
            .map(|position| {
                let epoch = position / pairs.len();
                if permutation.as_ref().is_none_or(|(cached, _)| *cached != epoch) {
                    let mut order: Vec<usize> = (0..pairs.len()).collect();
                    order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                        self.config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ));
                    permutation = Some((epoch, order));
                }
                pairs[permutation.as_ref().expect("filled").1[position % pairs.len()]].clone()
            })
            .collect();
        let schedule = Schedule {
            learning_rate: self.config.learning_rate,
            warmup_steps: self.config.warmup_steps,
            total_steps: self.config.steps,
            min_lr_ratio: self.config.min_lr_ratio,
        };
        let learning_rate = schedule.learning_rate_at(step);
        let pair_count = batch.len() as f32;
        let loss_kind = self.config.loss;
        let token_weight = self.config.token_loss_weight as f32;
        // One shard of pairs per thread on the CPU; each shard's loss is its share of the mean.
        let sharded = self.updater.backward(batch.len(), |model, rows| {
            let pairs = &batch[rows];
            let texts: Vec<(&str, &str, Option<&Range<usize>>)> = pairs
                .iter()
                .flat_map(|pair| {
                    [
                        (pair.prompt.as_str(), pair.chosen.as_str(), None),
                        (pair.prompt.as_str(), pair.rejected.as_str(), pair.rejected_error.as_ref()),
                    ]
                })
                .collect();
            let rows = tokenizer.batch_labelled(&texts);
            let hidden = model.encode(&rows);
            let (chosen, rejected) = split_pairs(model.score_hidden(hidden.clone(), &rows), pairs.len());
            let margin = chosen.clone() - rejected.clone();
            let mut loss = match loss_kind {
                PairwiseLoss::BradleyTerry => -log_sigmoid(margin.clone()).sum() / pair_count,
                PairwiseLoss::Mse => {
                    ((chosen - 1.0).powi_scalar(2) + rejected.powi_scalar(2)).sum() * (0.5 / pair_count)
                }
            };
            if let (true, Some(logits)) = (token_weight > 0.0, model.token_logits(hidden)) {
                loss = loss + token_loss(logits, &rows.labels, &rows.mask) * (token_weight / (2.0 * pair_count));
            }
            (loss, margin.detach().into_data().try_to_vec::<f32>().expect("f32"))
        });
        let not_finite = |bad: NonFinite| RewardTrainError::NotFinite {
            step: step + 1,
            quantity: bad.quantity(),
            value: bad.value(),
        };
        let (loss, grads, margins) = sharded.map_err(not_finite)?;
        let margins: Vec<f32> = margins.concat();
        let stats = self.updater.update(grads, loss, self.config.max_grad_norm, learning_rate).map_err(not_finite)?;
        Ok(RewardStep {
            step: step + 1,
            loss: stats.loss,
            accuracy: margins.iter().filter(|m| **m > 0.0).count() as f64 / margins.len() as f64,
            mean_margin: margins.iter().map(|&m| f64::from(m)).sum::<f64>() / margins.len() as f64,
            grad_norm: stats.grad_norm,
            learning_rate,
        })
    }

    /// Writes the model (HF layout), optimizer state and step to `dir` through a temporary
    /// directory and a rename.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), RewardTrainError> {
        let temporary = dir.with_extension("tmp");
        let fail = |path: &Path, error: std::io::Error| RewardTrainError::Checkpoint {
            path: path.to_path_buf(),
            message: error.to_string(),
        };
        if temporary.exists() {
            std::fs::remove_dir_all(&temporary).map_err(|error| fail(&temporary, error))?;
        }
        self.model().save_dir(&temporary)?;
        self.updater.optimizer().save(self.model(), &temporary.join("optimizer.safetensors"))?;
        let state_path = temporary.join("trainer_state.json");
        std::fs::write(&state_path, serde_json::to_string(&TrainerState { step: self.step() }).expect("json"))
            .map_err(|error| fail(&state_path, error))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|error| fail(dir, error))?;
        }
        std::fs::rename(&temporary, dir).map_err(|error| fail(dir, error))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor, TensorData};
    use prompting::Template;
    use tasks::synthetic::{Operator, SyntheticConfig, generate};

    use super::*;
    use crate::RobertaConfig;

    struct Gradients<'a>(&'a GradientsParams, Vec<(ParamId, Vec<f32>)>);
    impl ModuleVisitor for Gradients<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let grad =
                self.0.get::<D>(param.id).map(|g| g.into_data().try_to_vec::<f32>().unwrap()).unwrap_or_default();
            self.1.push((param.id, grad));
        }
    }

    /// Adds `eps` to element `index` of parameter `id`.
    struct Nudge(ParamId, usize, f32);
    impl ModuleMapper for Nudge {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if param.id != self.0 {
                return param;
            }
            let (index, eps) = (self.1, self.2);
            param.map(move |t| {
                let (device, shape) = (t.device(), t.shape());
                let mut values = t.into_data().try_to_vec::<f32>().unwrap();
                values[index] += eps;
                Tensor::from_data(TensorData::new(values, shape), &device).require_grad()
            })
        }
    }

    /// The token loss's and the pairwise loss's gradients (autodiff through the fused kernels
    /// and the token head) agree with central finite differences, parameter by parameter.
    #[test]
    fn loss_gradients_match_finite_differences() {
        let synthetic = SyntheticConfig {
            operators: vec![Operator::Add, Operator::Sub],
            max_operand: 9,
            max_operations: 2,
            train_size: 60,
            test_size: 5,
            ..SyntheticConfig::default()
        };
        let task = generate(&synthetic).unwrap();
        let corpus = task.train.problems.iter().map(|p| format!("{}\n{}", p.question, Template::Plain.response(p)));
        let tokenizer = policy_models::presets::train_tokenizer(corpus, 120).unwrap();
        let pairs = crate::comparisons::build_comparisons(&task.train, Template::Plain, 2, 0)[..6].to_vec();
        let device = Device::flex().autodiff();
        let config = RobertaConfig::tiny(tokenizer.vocab_size(), tokenizer.pad_id.unwrap(), 16, 1, 100);
        let tokenizer = RewardTokenizer::new(tokenizer, config.max_tokens());
        // Seeded, so that a failure reproduces (no other test of this binary initialises a model).
        device.seed(5);
        let model = RobertaRegressor::init(&config, &device).with_token_head();
        let texts: Vec<_> = pairs
            .iter()
            .flat_map(|p| {
                [
                    (p.prompt.as_str(), p.chosen.as_str(), None),
                    (p.prompt.as_str(), p.rejected.as_str(), p.rejected_error.as_ref()),
                ]
            })
            .collect();
        let rows = tokenizer.batch_labelled(&texts);
        let losses: [(&str, &dyn Fn(&RobertaRegressor) -> Tensor<1>); 2] = [
            ("token", &|m| {
                token_loss(m.token_logits(m.encode(&rows.ids, &rows.mask)).unwrap(), &rows.labels, &rows.mask)
            }),
            ("pairwise", &|m| {
                let (chosen, rejected) = split_pairs(m.score(&rows.ids, &rows.mask), pairs.len());
                -log_sigmoid(chosen - rejected).sum()
            }),
        ];
        for (name, loss) in losses {
            let grads = GradientsParams::from_grads(loss(&model).backward(), &model);
            let mut visitor = Gradients(&grads, Vec::new());
            model.visit(&mut visitor);
            let paths = policy_models::optim::parameter_paths(&model);
            let mut checked = 0;
            for (p, (id, grad)) in visitor.1.iter().enumerate() {
                // The token-type row is added to every token before a LayerNorm that divides by
                // the embeddings' scale (~0.035): a 1e-2 nudge is a third of it, and central
                // differences there miss by up to 25% (seen at another seed).
                if paths[p].0.contains("token_type") {
                    continue;
                }
                for k in 0..grad.len().min(2) {
                    let index = (k * 7919 + p * 31) % grad.len();
                    let eps = 1e-2;
                    let at = |eps| loss(&model.clone().map(&mut Nudge(*id, index, eps))).into_scalar::<f32>();
                    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                    let error = (numeric - grad[index]).abs() / (1e-2 + numeric.abs().max(grad[index].abs()));
                    assert!(
                        error < 0.05,
                        "{name}: parameter {p} element {index}: autodiff {} against {numeric}",
                        grad[index]
                    );
                    checked += 1;
                }
            }
            assert!(checked > 30, "{name}: {checked} elements checked");
        }
    }
}
