"""Reference numbers for cotlab's PPO, from TRL's PPOTrainer formulas (trl 0.2x, the PPO that
TRL shipped before removing it; cleanrl's PPO for language models): per-token rewards
(-kl_coef * KL, k1 or k3, plus the score at the last completion token), GAE, masked whitening,
the clipped policy loss, the clipped value loss, approxkl, clipfrac, val/clipfrac, objective/kl
(the KL summed per sequence, averaged) and explained variance, with d loss / d new log-probs and
d loss / d value predictions; `whiten_rewards` (TRL's masked_whiten with shift_mean=False over
the real tokens: cotlab puts the score on the last real token, where TRL's padding_mask_p1 also
counts one position past it), and the adaptive KL controller of Ziegler et al. (2019) as TRL's
old PPOTrainer had it (AdaptiveKLController).

    python tools/parity/make_ppo_fixtures.py
Writes crates/rl-algos/tests/fixtures/ppo_objective.json.
"""

import json
import pathlib

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "rl-algos" / "tests" / "fixtures" / "ppo_objective.json"

N, T = 3, 5
KL_COEF, GAMMA, LAM, CLIP, CLIP_VALUE, VF_COEF = 0.05, 1.0, 0.95, 0.2, 0.2, 0.1


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return variance * (mask.sum() / (mask.sum() - 1))


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


class AdaptiveKLController:
    """Ziegler et al. (2019), as trl.trainer.utils.AdaptiveKLController (TRL <= 0.11)."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current, n_steps):
        target = self.target
        proportional_error = np.clip(current / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


def targets(logprobs, ref_logprobs, values, scores, lengths, mask, estimator, whiten_rewards=False):
    logr = ref_logprobs - logprobs
    kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr
    kl = kl * mask  # TRL fills padding log-probs with INVALID_LOGPROB in both: kl is 0 there
    rewards = -KL_COEF * kl * mask
    for i in range(N):
        rewards[i, lengths[i] - 1] += scores[i]
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    values = values * mask
    lastgaelam = 0
    reversed_advantages = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + GAMMA * nextvalues - values[:, t]
        lastgaelam = delta + GAMMA * LAM * lastgaelam
        reversed_advantages.append(lastgaelam)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, mask) * mask
    return rewards, advantages, returns, masked_mean(kl, mask), kl.sum(1).mean()


def main():
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 3, 4]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    logprobs = -torch.rand(N, T, generator=gen) * 2
    ref = logprobs + (torch.rand(N, T, generator=gen) - 0.5) * 0.6
    values = torch.randn(N, T, generator=gen) * 0.5
    scores = torch.tensor([1.0, -0.5, 2.0])
    new_logprobs = logprobs + (torch.rand(N, T, generator=gen) - 0.5) * 0.8
    vpred = values + torch.randn(N, T, generator=gen) * 0.4
    out = {
        "kl_coef": KL_COEF, "gamma": GAMMA, "lam": LAM, "cliprange": CLIP, "cliprange_value": CLIP_VALUE, "vf_coef": VF_COEF,
        "lengths": lengths, "mask": mask.tolist(), "logprobs": logprobs.tolist(), "ref_logprobs": ref.tolist(),
        "values": values.tolist(), "scores": scores.tolist(), "new_logprobs": new_logprobs.tolist(), "vpred": vpred.tolist(),
        "cases": [],
    }
    for estimator, whiten_rewards in (("k1", False), ("k3", False), ("k1", True)):
        rewards, advantages, returns, kl, sequence_kl = targets(logprobs, ref, values, scores, lengths, mask, estimator, whiten_rewards)
        x = new_logprobs.clone().requires_grad_(True)
        v = vpred.clone().requires_grad_(True)
        vpredclipped = torch.clamp(v, values - CLIP_VALUE, values + CLIP_VALUE)
        vf_losses1 = torch.square(v - returns)
        vf_losses2 = torch.square(vpredclipped - returns)
        vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
        ratio = torch.exp(x - logprobs)
        pg_losses = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
        pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
        loss = pg_loss + VF_COEF * vf_loss
        loss.backward()
        diff = (x - logprobs).detach()
        residual = returns - values
        explained = 1 - masked_var(residual, mask) / masked_var(returns, mask)
        out["cases"].append({
            "kl_estimator": estimator,
            "whiten_rewards": whiten_rewards,
            "rewards": rewards.tolist(),
            "advantages": advantages.tolist(),
            "returns": returns.tolist(),
            "kl": kl.item(),
            "objective/kl": sequence_kl.item(),
            "val/clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask).item(),
            "loss": loss.item(),
            "loss/policy": pg_loss.item(),
            "loss/value": vf_loss.item(),
            "policy/approxkl": (0.5 * masked_mean(diff ** 2, mask)).item(),
            "policy/clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask).item(),
            "val/explained_variance": explained.item(),
            "grad_logprobs": x.grad.tolist(),
            "grad_vpred": v.grad.tolist(),
        })
    # The adaptive KL coefficient over a few steps: KLs below, near and above the target, with a
    # batch large enough against the horizon that the +-20% clip of the error binds.
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    observed, batch = [1.0, 5.5, 6.0, 9.0, 30.0, 0.0], 512
    coefficients = []
    for current in observed:
        controller.update(current, batch)
        coefficients.append(controller.value)
    out["adaptive_kl"] = {"init_kl_coef": 0.2, "target": 6.0, "horizon": 10000, "batch": batch, "observed": observed, "coefficients": coefficients}
    OUT.write_text(json.dumps(out) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
