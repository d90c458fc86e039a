//! Advantages: GRPO's group-relative normalisation (DeepSeekMath, eq. for outcome supervision,
//! as TRL computes it) and, for PPO, generalised advantage estimation.
//!
//! GRPO, per group of G rewards r_1..r_G:
//!   A_i = (r_i - mean(r)) / (s + 1e-4),   s = std(r) (`group`), std of the batch (`batch`), or
//!   A_i = r_i - mean(r)                                                            (`none`),
//! with the std Bessel-corrected. A group whose rewards are all equal (r_i == r_j bit for bit)
//! has A_i = 0 exactly, whatever the scaling.
//!
//! Legend: `G` completions per prompt (`num_generations`), `N` = prompts x G completions.

use serde::{Deserialize, Serialize};

/// How GRPO scales rewards after subtracting the group mean (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the standard deviation of the group (DeepSeekMath's GRPO).
    Group,
    /// Divide by the standard deviation of the whole batch (Understanding R1-Zero's advice,
    /// TRL's `batch`).
    Batch,
    /// No scaling (Dr. GRPO: the std division biases towards easy and hard questions).
    None,
}

/// Bessel-corrected standard deviation (TRL's `nanstd`, torch's default).
fn std(values: &[f32]) -> f32 {
    let n = values.len();
    if n < 2 {
        return 0.0;
    }
    let mean = values.iter().sum::<f32>() / n as f32;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / (n - 1) as f32).sqrt()
}

/// Group-relative advantages of rewards laid out group by group ([N], N a multiple of G):
/// (r - group mean) / (std + 1e-4), the std per `scale`. Also returns, per completion, whether
/// its group's rewards were all equal, the groups TRL counts in `frac_reward_zero_std`; those
/// completions' advantages are exactly 0. Equality is exact, where TRL tests the f32 std with
/// `isclose(std, 0)`: equal rewards whose f32 mean rounds (8 x 2.6) have a std of 2.5e-7, which
/// that test may miss and which would give each member a spurious nonzero advantage.
pub fn group_advantages(rewards: &[f32], num_generations: usize, scale: ScaleRewards) -> (Vec<f32>, Vec<bool>) {
    assert!(num_generations > 0 && rewards.len().is_multiple_of(num_generations), "rewards must come in whole groups");
    let batch_std = std(rewards);
    let mut advantages = Vec::with_capacity(rewards.len());
    let mut zero_std = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(num_generations) {
        // Equality, not a threshold on the computed std: in f32 the mean of equal rewards can
        // be off by an ulp (8 x 2.6 gives a std of 2.5e-7), and the division by std + 1e-4 then
        // turns that rounding error into advantages of -0.0024, a signal that is not there.
        let all_equal = group.iter().all(|&reward| reward == group[0]);
        let mean = group.iter().sum::<f32>() / group.len() as f32;
        let divisor = match scale {
            ScaleRewards::Group => Some(std(group)),
            ScaleRewards::Batch => Some(batch_std),
            ScaleRewards::None => None,
        };
        for &reward in group {
            let centred = reward - mean;
            advantages.push(if all_equal { 0.0 } else { divisor.map_or(centred, |d| centred / (d + 1e-4)) });
            zero_std.push(all_equal);
        }
    }
    (advantages, zero_std)
}

/// Generalised advantage estimation (Schulman et al., 2016) over one completion's tokens:
/// delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, with V after the
/// last token 0; returns (advantages, returns = advantages + values).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lambda: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(rewards.len(), values.len());
    let mut advantages = vec![0.0f32; rewards.len()];
    let mut next_advantage = 0.0f32;
    for t in (0..rewards.len()).rev() {
        let next_value = values.get(t + 1).copied().unwrap_or(0.0);
        let delta = rewards[t] + gamma * next_value - values[t];
        next_advantage = delta + gamma * lambda * next_advantage;
        advantages[t] = next_advantage;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// Whitening (PPO's advantage normalisation): (x - mean) / sqrt(var + 1e-8) over the masked
/// entries, with the unbiased variance, as TRL's `masked_whiten`.
pub fn whiten(values: &[f32]) -> Vec<f32> {
    let n = values.len();
    if n < 2 {
        return values.to_vec();
    }
    let mean = values.iter().sum::<f32>() / n as f32;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / (n - 1) as f32;
    values.iter().map(|v| (v - mean) / (variance + 1e-8).sqrt()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rewards that are the same f32 sums: a threshold on their computed std misses them.
    fn equal_groups() -> Vec<Vec<f32>> {
        vec![vec![2.6; 8], vec![0.1 + 0.2; 8], vec![0.1 + 0.2 + 2.6; 6], vec![0.0; 2]]
    }

    #[test]
    fn groups_of_equal_rewards_get_exactly_zero_advantages() {
        // The case that motivated exact equality: the f32 std of 8 x 2.6 is not below 1e-8.
        assert!(std(&[2.6; 8]) > 1e-8, "std of 8 x 2.6 is {}", std(&[2.6; 8]));
        for scale in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
            for group in equal_groups() {
                // An equal group next to a group with signal, so the batch std is not 0.
                let mut rewards = group.clone();
                rewards.extend((0..group.len()).map(|i| i as f32));
                let (advantages, zero_std) = group_advantages(&rewards, group.len(), scale);
                let g = group.len();
                assert!(advantages[..g].iter().all(|&a| a.to_bits() == 0), "{scale:?} {group:?}: {advantages:?}");
                assert_eq!(&zero_std[..g], vec![true; g].as_slice());
                assert!(
                    zero_std[g..].iter().all(|z| !z) && advantages[g..].iter().any(|&a| a != 0.0),
                    "{scale:?}: {advantages:?}"
                );
            }
        }
    }

    #[test]
    fn groups_that_differ_by_one_ulp_are_not_zero_variance() {
        let next = f32::from_bits(2.6f32.to_bits() + 1);
        let (_, zero_std) = group_advantages(&[2.6, 2.6, 2.6, next], 4, ScaleRewards::Group);
        assert_eq!(zero_std, vec![false; 4]);
    }

    #[test]
    fn gae_with_lambda_one_is_the_discounted_return_minus_value() {
        let rewards = [0.0, 0.0, 1.0];
        let values = [0.2, 0.5, 0.1];
        let (advantages, returns) = gae(&rewards, &values, 0.9, 1.0);
        // Returns: 0.81, 0.9, 1.0.
        for (got, want) in returns.iter().zip([0.81, 0.9, 1.0]) {
            assert!((got - want).abs() < 1e-6);
        }
        assert!((advantages[0] - (0.81 - 0.2)).abs() < 1e-6);
        // lambda = 0: one-step TD errors.
        let (td, _) = gae(&rewards, &values, 0.9, 0.0);
        assert!((td[1] - (0.0 + 0.9 * 0.1 - 0.5)).abs() < 1e-6);
    }

    #[test]
    fn whitened_values_have_zero_mean_and_unit_variance() {
        let white = whiten(&[1.0, 2.0, 3.0, 10.0]);
        let mean: f32 = white.iter().sum::<f32>() / 4.0;
        let var: f32 = white.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 3.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4);
    }
}
