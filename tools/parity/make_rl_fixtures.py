"""Reference numbers for cotlab's GRPO objective, from TRL's formulas (trl 1.16,
GRPOTrainer._generate_and_score_completions and _compute_loss), evaluated with PyTorch autograd.

Covers: group-relative advantages for scale_rewards = group | batch | none (TRL's nanstd is
Bessel-corrected, eps 1e-4); the per-token clipped objective with epsilon and epsilon_high; the
k3 KL estimator exp(ref - logp) - (ref - logp) - 1 added with weight beta; the loss aggregations
grpo, bnpo, dr_grpo, dapo; the clip-ratio and KL metrics; and d loss / d per_token_logps.

    python tools/parity/make_rl_fixtures.py
Writes crates/rl-algos/tests/fixtures/grpo_objective.json.
"""

import json
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "rl-algos" / "tests" / "fixtures" / "grpo_objective.json"

G = 4  # num_generations
B = 8  # completions (2 prompts)
T = 6  # padded completion length
MAX_COMPLETION_LENGTH = 8
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def nanstd(x, dim=None):
    if dim is None:
        mean = x.mean()
        n = x.numel()
        return (((x - mean) ** 2).sum() / (n - 1)).sqrt()
    mean = x.mean(dim=dim, keepdim=True)
    n = x.size(dim)
    return (((x - mean) ** 2).sum(dim=dim) / (n - 1)).sqrt()


def advantages(rewards, scale):
    grouped = rewards.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    if scale in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(G)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv, std


def loss_and_metrics(logps, old, ref, adv, mask, loss_type, beta):
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    a = adv.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * MAX_COMPLETION_LENGTH)
    elif loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    def masked_mean(x):
        return ((x * mask).sum() / mask.sum()).item()
    is_low = (coef_1 < 1 - EPS_LOW) & (a < 0)
    is_high = (coef_1 > 1 + EPS_HIGH) & (a > 0)
    metrics = {
        "kl": masked_mean(kl),
        "clip_ratio/low_mean": masked_mean(is_low.float()),
        "clip_ratio/high_mean": masked_mean(is_high.float()),
        "clip_ratio/region_mean": masked_mean((is_low | is_high).float()),
    }
    return loss, metrics


def main():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.tensor([2.5, 0.0, 0.5, 2.5, 1.0, 1.0, 1.0, 1.0])  # second group: all equal
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logps = -torch.rand(B, T, generator=gen) * 3
    # Old log-probs differ by up to +-0.4 so that both clip sides are hit.
    old = logps + (torch.rand(B, T, generator=gen) - 0.5) * 0.8
    ref = logps + (torch.rand(B, T, generator=gen) - 0.5) * 0.5
    out = {
        "num_generations": G,
        "epsilon": EPS_LOW,
        "epsilon_high": EPS_HIGH,
        "beta": BETA,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "rewards": rewards.tolist(),
        "mask": mask.tolist(),
        "per_token_logps": logps.tolist(),
        "old_per_token_logps": old.tolist(),
        "ref_per_token_logps": ref.tolist(),
        "advantages": {},
        "losses": [],
    }
    for scale in ("group", "batch", "none"):
        adv, std = advantages(rewards, scale)
        out["advantages"][scale] = adv.tolist()
    adv = torch.tensor(out["advantages"]["group"])
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta in (0.0, BETA):
            x = logps.clone().requires_grad_(True)
            loss, metrics = loss_and_metrics(x, old, ref, adv, mask, loss_type, beta)
            loss.backward()
            out["losses"].append({
                "loss_type": loss_type,
                "beta": beta,
                "loss": loss.item(),
                "grad": x.grad.tolist(),
                **metrics,
            })
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
