"""Reference numbers for cotlab's RLOO, transcribed from TRL 1.16's RLOOTrainer
(`_generate_and_score_completions` and `_compute_loss`, trl/trainer/rloo_trainer.py):

    per_token_kl = old_per_token_logps - ref_per_token_logps          (k1)
    rewards      = rewards - beta * (per_token_kl * completion_mask).sum(-1)
    advantages   = rewards - (group sum - rewards) / (k - 1)         (leave-one-out)
    advantages   = (advantages - mean) / (std + 1e-4)                 (normalize_advantages)
    logps        = (per_token_logps * completion_mask).sum(1)         (one ratio per sequence)
    loss         = mean(-min(exp(logps - old_logps) * A, clamp(., 1 - eps_low, 1 + eps_high) * A))

with d loss / d per-token log-probs. The new log-probs differ from the old ones (as on a second
iteration over a batch) so that the clip binds on some sequences. Every reward is scorable (no
NaN rows), as cotlab's rewards always are.

    python tools/parity/make_rloo_fixtures.py
Writes crates/algo-rloo/tests/fixtures/rloo.json.
"""

import json
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "algo-rloo" / "tests" / "fixtures" / "rloo.json"

PROMPTS, K, T = 2, 4, 5
BETA, EPSILON, EPSILON_HIGH = 0.05, 0.2, 0.28


def nanstd(tensor):
    # trl.trainer.utils.nanstd (Bessel-corrected), for tensors without NaNs.
    mean = torch.nanmean(tensor, dim=None, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=None, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=None, keepdim=True)
    return torch.sqrt(variance * count / (count - 1)).squeeze()


def advantages_of(rewards, old_per_token_logps, ref_per_token_logps, completion_mask, normalize):
    per_token_kl = old_per_token_logps - ref_per_token_logps
    kl = (per_token_kl * completion_mask).sum(-1)
    rewards = rewards - BETA * kl
    grouped_rewards = rewards.view(-1, K)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    token_kl_mean = (per_token_kl * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    return advantages, kl, token_kl_mean.item()


def loss_of(per_token_logps, old_logps, advantages, completion_mask):
    logps = (per_token_logps * completion_mask).sum(1)
    log_ratio = logps - old_logps
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - EPSILON, 1 + EPSILON_HIGH)
    per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    loss = per_sequence_loss.mean()
    is_low_clipped = (coef_1 < 1 - EPSILON) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + EPSILON_HIGH) & (advantages > 0)
    return loss, (is_low_clipped | is_high_clipped).float().mean().item()


def main():
    generator = torch.Generator().manual_seed(0)
    n = PROMPTS * K
    lengths = [5, 3, 1, 4, 2, 5, 5, 3]
    mask = torch.tensor([[1.0 if t < length else 0.0 for t in range(T)] for length in lengths])
    old = -torch.rand(n, T, generator=generator) * 2.0
    ref = old + torch.randn(n, T, generator=generator) * 0.3
    # New log-probs: the old ones moved by a per-sequence shift large enough to leave the clip range.
    shifts = torch.tensor([0.5, -0.4, 0.02, -0.05, 0.3, -0.6, 0.1, 0.0])
    new = old + shifts[:, None] / torch.tensor(lengths, dtype=torch.float32)[:, None]
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 2.0, 1.0])
    # Padding positions hold junk, which the mask must remove.
    old, ref, new = [torch.where(mask > 0, x, torch.full_like(x, -7.0)) for x in (old, ref, new)]
    old_logps = (old * mask).sum(1)
    cases = []
    for normalize in (False, True):
        advantages, kl, token_kl_mean = advantages_of(rewards, old, ref, mask, normalize)
        per_token = new.clone().requires_grad_(True)
        loss, clip_ratio = loss_of(per_token, old_logps, advantages, mask)
        loss.backward()
        cases.append(
            {
                "normalize_advantages": normalize,
                "sequence_kl": kl.tolist(),
                "token_kl_mean": token_kl_mean,
                "advantages": advantages.tolist(),
                "loss": loss.item(),
                "clip_ratio_region_mean": clip_ratio,
                "grad_per_token_logps": per_token.grad.tolist(),
            }
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "generated_by": "tools/parity/make_rloo_fixtures.py",
                "torch_version": torch.__version__,
                "num_generations": K,
                "beta": BETA,
                "epsilon": EPSILON,
                "epsilon_high": EPSILON_HIGH,
                "lengths": lengths,
                "rewards": rewards.tolist(),
                "old_per_token_logps": old.tolist(),
                "ref_per_token_logps": ref.tolist(),
                "new_per_token_logps": new.tolist(),
                "cases": cases,
            }
        )
        + "\n"
    )
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
