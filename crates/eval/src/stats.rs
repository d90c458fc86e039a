//! Statistics for the study: confidence intervals, pass@k and maj@k, and the across-run
//! figures (mean and spread over seeds, steps to convergence, variance of per-step quantities).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The Wilson score interval for `successes` out of `n` at normal quantile `z` (1.96 for 95%).
/// Unlike the normal approximation it stays inside [0, 1] and is sensible at 0% and 100%.
/// `n = 0` gives [0, 1].
pub fn wilson_interval(successes: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n_f = n as f64;
    let p = successes as f64 / n_f;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n_f;
    let center = (p + z2 / (2.0 * n_f)) / denominator;
    let half_width = z / denominator * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    ((center - half_width).max(0.0), (center + half_width).min(1.0))
}

/// The unbiased pass@k estimator of Chen et al. (2021): the probability that at least one of
/// `k` samples drawn without replacement from `n` samples, `correct` of which are correct, is
/// correct: 1 - C(n - c, k) / C(n, k), computed as a stable product.
///
/// # Panics
/// When `k > n` or `correct > n`: pass@k needs at least k samples.
pub fn pass_at_k(n: usize, correct: usize, k: usize) -> f64 {
    assert!(k <= n && correct <= n, "pass@k needs k <= n and correct <= n (n={n}, c={correct}, k={k})");
    if n - correct < k {
        return 1.0;
    }
    let miss_all: f64 = ((n - correct + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product();
    1.0 - miss_all
}

/// The most frequent extracted answer among samples (`None` entries, where nothing could be
/// extracted, do not vote); ties go to the answer seen first. maj@k is whether this equals the
/// gold answer.
pub fn majority_answer<'a>(answers: impl IntoIterator<Item = Option<&'a str>>) -> Option<&'a str> {
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for (position, answer) in answers.into_iter().enumerate() {
        if let Some(answer) = answer {
            counts.entry(answer).or_insert((0, position)).0 += 1;
        }
    }
    counts
        .into_iter()
        .max_by(|(_, (count_a, first_a)), (_, (count_b, first_b))| count_a.cmp(count_b).then(first_b.cmp(first_a)))
        .map(|(answer, _)| answer)
}

/// Mean and sample standard deviation of a set of values (over seeds, say).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    /// Arithmetic mean (NaN for no values).
    pub mean: f64,
    /// Sample standard deviation, with n - 1 in the denominator (0 for a single value).
    pub std: f64,
    /// Number of values.
    pub n: usize,
}

/// Mean and sample standard deviation, of f64s or f32s (rewards), in f64.
pub fn mean_std<T: Copy + Into<f64>>(values: &[T]) -> MeanStd {
    let values: Vec<f64> = values.iter().map(|&value| value.into()).collect();
    let n = values.len();
    if n == 0 {
        return MeanStd { mean: f64::NAN, std: f64::NAN, n };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let std = sample_variance(&values).sqrt();
    MeanStd { mean, std, n }
}

/// Sample variance (n - 1 in the denominator; 0 for fewer than two values). The stability
/// charts use it on per-step quantities such as `update_norm` and `reward_std`.
pub fn sample_variance(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 2 {
        return 0.0;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    values.iter().map(|value| (value - mean).powi(2)).sum::<f64>() / (n - 1) as f64
}

/// The 97.5% quantile of Student's t distribution with `df` degrees of freedom: the multiplier
/// of a two-sided 95% confidence interval for a mean of `df + 1` values. NaN for df = 0.
pub fn student_t_975(df: usize) -> f64 {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    match StudentsT::new(0.0, 1.0, df as f64) {
        Ok(t) if df > 0 => t.inverse_cdf(0.975),
        _ => f64::NAN,
    }
}

/// A mean over independent runs (seeds) with its two-sided 95% Student-t interval
/// `mean ± t(0.975, n - 1) · sd / √n`. With one value the interval is the value itself (no
/// spread can be estimated from one run: say so rather than invent one).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanCi {
    /// Mean.
    pub mean: f64,
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
    /// Number of values.
    pub n: usize,
}

/// See [`MeanCi`].
pub fn mean_ci95(values: &[f64]) -> MeanCi {
    let MeanStd { mean, std, n } = mean_std(values);
    if n < 2 {
        return MeanCi { mean, low: mean, high: mean, n };
    }
    let half = student_t_975(n - 1) * std / (n as f64).sqrt();
    MeanCi { mean, low: mean - half, high: mean + half, n }
}

/// The 95% interval of a group's accuracy (what reports print and charts draw): the wider of the across-seed Student-t
/// interval of the mean and the mean of the cells' Wilson (test-set) intervals. With one seed,
/// or methods that give the same answers at every seed, the t interval collapses and the
/// test-set uncertainty is what remains. Clamped to [0, 1].
pub fn accuracy_interval(means: &[f64], wilson_lows: &[f64], wilson_highs: &[f64]) -> (f64, f64, f64) {
    let seeds = mean_ci95(means);
    let low = mean_std(wilson_lows).mean;
    let high = mean_std(wilson_highs).mean;
    // An accuracy lies in [0, 1]; a t interval over few seeds can reach past either end.
    (seeds.mean, seeds.low.min(low).max(0.0), seeds.high.max(high).min(1.0))
}

/// Exponential moving average with TensorBoard's convention: s_0 = x_0, then
/// s_t = weight * s_{t-1} + (1 - weight) * x_t. `weight` in [0, 1): 0 is no smoothing.
pub fn ema_smooth(values: &[f64], weight: f64) -> Vec<f64> {
    let mut smoothed = Vec::with_capacity(values.len());
    let mut last = None;
    for &value in values {
        let next = match last {
            None => value,
            Some(previous) => weight * previous + (1.0 - weight) * value,
        };
        smoothed.push(next);
        last = Some(next);
    }
    smoothed
}

/// Steps to convergence: the first step at which the EMA-smoothed curve (`smoothing` as in
/// [`ema_smooth`]) has gone `fraction` (0.9 by convention) of the way from its first to its
/// final value. For a curve that starts at 0, such as accuracy, that is the first step where the
/// smoothed curve reaches 90% of its final value; measuring from the start keeps the figure
/// meaningful for curves that start elsewhere or fall (a loss). `None` for an empty curve or
/// mismatched lengths.
pub fn steps_to_convergence(steps: &[u64], values: &[f64], smoothing: f64, fraction: f64) -> Option<u64> {
    if steps.is_empty() || steps.len() != values.len() {
        return None;
    }
    let smoothed = ema_smooth(values, smoothing);
    let first = smoothed[0];
    let last = *smoothed.last()?;
    let target = first + fraction * (last - first);
    let reached = |value: f64| if last >= first { value >= target } else { value <= target };
    smoothed.iter().position(|&value| reached(value)).map(|index| steps[index])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn wilson_matches_reference_values() {
        // Reference: statsmodels' proportion_confint(count, nobs, alpha=0.05, method="wilson").
        let z = 1.959_963_984_540_054;
        let cases = [(5, 10, 0.236_593_1, 0.763_406_9), (0, 10, 0.0, 0.277_532_8), (10, 10, 0.722_467_2, 1.0)];
        for (successes, n, low, high) in cases {
            let (got_low, got_high) = wilson_interval(successes, n, z);
            assert!(close(got_low, low, 1e-5) && close(got_high, high, 1e-5), "{successes}/{n}: {got_low} {got_high}");
        }
        assert_eq!(wilson_interval(0, 0, z), (0.0, 1.0));
    }

    #[test]
    fn t_quantiles_and_mean_intervals_match_scipy() {
        // Reference: scipy.stats.t.ppf(0.975, df).
        for (df, expected) in [
            (1, 12.706_205),
            (2, 4.302_653),
            (7, 2.364_624),
            (30, 2.042_272),
            (40, 2.021_075),
            (60, 2.000_298),
            (120, 1.979_930),
            (1000, 1.962_339),
        ] {
            assert!(close(student_t_975(df), expected, 1e-5), "df {df}: {}", student_t_975(df));
        }
        // scipy.stats.t.interval(0.95, 2, loc=mean, scale=sem) for [0.2, 0.3, 0.4]: (0.0516, 0.5484).
        let ci = mean_ci95(&[0.2, 0.3, 0.4]);
        assert!(
            close(ci.mean, 0.3, 1e-12) && close(ci.low, 0.051_59, 1e-4) && close(ci.high, 0.548_41, 1e-4),
            "{ci:?}"
        );
        let single = mean_ci95(&[0.5]);
        assert_eq!((single.low, single.high, single.n), (0.5, 0.5, 1));
        assert!(student_t_975(0).is_nan());
    }

    #[test]
    fn pass_at_k_is_the_unbiased_estimator() {
        assert!(close(pass_at_k(10, 3, 1), 0.3, 1e-12));
        // 1 - C(7,5)/C(10,5) = 1 - 21/252
        assert!(close(pass_at_k(10, 3, 5), 1.0 - 21.0 / 252.0, 1e-12));
        assert_eq!(pass_at_k(10, 6, 5), 1.0);
        assert_eq!(pass_at_k(4, 0, 4), 0.0);
    }

    #[test]
    fn majority_answer_ignores_missing_and_breaks_ties_by_first_seen() {
        assert_eq!(majority_answer([Some("3"), None, Some("4"), Some("4")]), Some("4"));
        assert_eq!(majority_answer([Some("5"), Some("3"), Some("3"), Some("5")]), Some("5"));
        assert_eq!(majority_answer([None, None]), None);
    }

    #[test]
    fn mean_and_sample_std() {
        let summary = mean_std(&[0.5, 0.6, 0.7]);
        assert!(close(summary.mean, 0.6, 1e-12) && close(summary.std, 0.1, 1e-12));
        assert_eq!(mean_std(&[0.4]).std, 0.0);
        assert!(mean_std::<f64>(&[]).mean.is_nan());
        assert!(close(sample_variance(&[1.0, 2.0, 3.0, 4.0]), 5.0 / 3.0, 1e-12));
    }

    #[test]
    fn convergence_step_of_rising_and_falling_curves() {
        let steps: Vec<u64> = (0..10).map(|i| i * 10).collect();
        let rising = [0.0, 0.2, 0.5, 0.8, 0.9, 0.95, 1.0, 1.0, 1.0, 1.0];
        // Unsmoothed: 90% of the final 1.0 is first reached at 0.9, step 40.
        assert_eq!(steps_to_convergence(&steps, &rising, 0.0, 0.9), Some(40));
        // Smoothing delays it.
        assert!(steps_to_convergence(&steps, &rising, 0.6, 0.9).unwrap() > 40);
        let falling: Vec<f64> = rising.iter().map(|v| 2.0 - v).collect();
        assert_eq!(steps_to_convergence(&steps, &falling, 0.0, 0.9), Some(40));
        assert_eq!(steps_to_convergence(&[], &[], 0.0, 0.9), None);
    }

    #[test]
    fn accuracy_interval_keeps_test_set_uncertainty_when_seeds_agree() {
        // Three seeds with the same answers: no across-seed spread, the Wilson interval remains.
        let (mean, low, high) = accuracy_interval(&[0.3, 0.3, 0.3], &[0.25, 0.25, 0.25], &[0.36, 0.36, 0.36]);
        assert!(
            (mean - 0.3).abs() < 1e-12 && (low - 0.25).abs() < 1e-12 && (high - 0.36).abs() < 1e-12,
            "{mean} {low} {high}"
        );
        // Seeds that disagree widely: the t interval is the wider one.
        let (_, low, high) = accuracy_interval(&[0.1, 0.3, 0.5], &[0.08, 0.26, 0.45], &[0.13, 0.34, 0.55]);
        assert!(low == 0.0 && high > 0.7, "clamped below at 0: {low} {high}");
    }
}
