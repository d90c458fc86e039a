//! The reward model as a reward function: completions are detokenised text already; they are
//! re-tokenised with the reward model's tokenizer, scored in batches, and optionally normalised
//! with a running mean and standard deviation.

use std::sync::Mutex;

use rl_algos::rewards::{RewardFunction, RewardInput};

use crate::roberta::RobertaRegressor;
use crate::train::{RewardModel, RewardTokenizer};

/// Running mean and variance (Welford), for reward normalisation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunningMeanStd {
    count: f64,
    mean: f64,
    m2: f64,
}

impl RunningMeanStd {
    /// Adds values.
    pub fn update(&mut self, values: &[f32]) {
        for &value in values {
            self.count += 1.0;
            let delta = f64::from(value) - self.mean;
            self.mean += delta / self.count;
            self.m2 += delta * (f64::from(value) - self.mean);
        }
    }

    /// (mean, std); std 1 until two values are seen.
    pub fn mean_std(&self) -> (f64, f64) {
        if self.count < 2.0 {
            return (self.mean, 1.0);
        }
        (self.mean, (self.m2 / (self.count - 1.0)).sqrt().max(1e-8))
    }
}

/// A trained reward model behind the reward-function trait.
pub struct RewardModelFunction<M: RewardModel = RobertaRegressor> {
    model: M,
    tokenizer: RewardTokenizer,
    batch_size: usize,
    normalizer: Option<Mutex<RunningMeanStd>>,
}

impl<M: RewardModel> RewardModelFunction<M> {
    /// Wraps `model` (an inference copy is kept: scoring builds no autodiff graph). With
    /// `normalize`, scores are standardised by the running statistics of all scores so far.
    pub fn new(model: &M, tokenizer: RewardTokenizer, batch_size: usize, normalize: bool) -> Self {
        assert_eq!(tokenizer.layout(), model.layout(), "the tokenizer must make the rows the reward model reads");
        Self {
            model: model.valid(),
            tokenizer,
            batch_size: batch_size.max(1),
            normalizer: normalize.then(|| Mutex::new(RunningMeanStd::default())),
        }
    }

    /// Raw scores, in batches.
    pub fn raw_scores(&self, batch: &[RewardInput<'_>]) -> Vec<f32> {
        let mut scores = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(self.batch_size) {
            let texts: Vec<(&str, &str)> = chunk.iter().map(|input| (input.prompt, input.completion)).collect();
            scores.extend(
                self.model
                    .score_rows(&self.tokenizer.batch(&texts))
                    .into_data()
                    .try_to_vec::<f32>()
                    .expect("f32 scores"),
            );
        }
        scores
    }
}

impl<M: RewardModel> RewardFunction for RewardModelFunction<M> {
    fn name(&self) -> &str {
        "reward_model"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Vec<f32> {
        let scores = self.raw_scores(batch);
        let Some(normalizer) = &self.normalizer else { return scores };
        let mut stats = normalizer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        stats.update(&scores);
        let (mean, std) = stats.mean_std();
        scores.iter().map(|&s| ((f64::from(s) - mean) / std) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_statistics_match_the_batch_formulas() {
        let mut stats = RunningMeanStd::default();
        stats.update(&[1.0, 2.0]);
        stats.update(&[3.0, 4.0]);
        let (mean, std) = stats.mean_std();
        assert!((mean - 2.5).abs() < 1e-12);
        assert!((std - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
