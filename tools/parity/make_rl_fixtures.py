"""Reference numbers for cotlab's GRPO objective, from TRL's formulas (trl 1.16,
GRPOTrainer._generate_and_score_completions and _compute_loss), evaluated with PyTorch autograd.

Covers: group-relative advantages for scale_rewards = group | batch | none (TRL's nanstd is
Bessel-corrected, eps 1e-4); the per-token clipped objective with epsilon and epsilon_high; the
k3 KL estimator exp(ref - logp) - (ref - logp) - 1 added with weight beta; the loss aggregations
grpo, bnpo, dr_grpo, dapo; the clip-ratio and KL metrics; and d loss / d per_token_logps.

Also, in grpo_variants.json, TRL 1.16's branches of `_compute_loss` beyond the default: both
clip sides hit with both advantage signs, the two-sided clip `delta`, sequence-level importance
sampling (GSPO), `top_entropy_quantile` (`get_high_entropy_mask`), the `entropy_coef` bonus,
gradient accumulation over two micro-batches (each micro-batch's loss divided by the number of
accumulation steps; `dapo` normalised by the generation batch's tokens), and DAPO's soft
overlong punishment as `trl.rewards.get_soft_overlong_punishment` computes it.

    python tools/parity/make_rl_fixtures.py
Writes crates/rl-algos/tests/fixtures/grpo_objective.json and grpo_variants.json.
"""

import json
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "rl-algos" / "tests" / "fixtures" / "grpo_objective.json"
OUT_VARIANTS = OUT.with_name("grpo_variants.json")

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
    variants()


# --- TRL 1.16's GRPOTrainer._compute_loss, transcribed branch by branch (one process). ---

def high_entropy_mask(entropies, mask, threshold):
    """GRPOTrainer.get_high_entropy_mask on one process."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    entropy_threshold = torch.quantile(local, threshold)
    masked_entropies = entropies * mask.float()
    return (masked_entropies >= entropy_threshold) & mask.bool()


def trl_compute_loss(logps, old, ref, adv, mask, entropies, cfg, num_items_in_batch, accumulation_steps):
    """The loss of one micro-batch (train mode, steps_per_generation = accumulation_steps)."""
    q = cfg["top_entropy_quantile"]
    entropy_mask = high_entropy_mask(entropies, mask, 1 - q) if q < 1.0 else None
    advantages = adv.unsqueeze(1)
    log_ratio = logps - old
    if cfg["importance_sampling_level"] == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    beta = cfg["beta"]
    if beta != 0.0:
        per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    if cfg["delta"] is not None:
        coef_1 = torch.clamp(coef_1, max=cfg["delta"])
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    loss_type = cfg["loss_type"]
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation_steps
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * MAX_COMPLETION_LENGTH) / accumulation_steps
    elif loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0) * accumulation_steps / accumulation_steps
        loss = (per_token_loss * mask).sum() / normalizer
    if cfg["entropy_coef"] != 0.0:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation_steps
        loss = loss - cfg["entropy_coef"] * entropy_loss

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return (x.sum() / max(float(x.shape[0]), 1.0)).item()
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

    is_low = (coef_1 < 1 - EPS_LOW) & (advantages < 0)
    is_high = (coef_1 > 1 + EPS_HIGH) & (advantages > 0)
    metrics = {
        "clip_ratio/low_mean": global_masked_mean(is_low.float()),
        "clip_ratio/high_mean": global_masked_mean(is_high.float()),
        "clip_ratio/region_mean": global_masked_mean((is_low | is_high).float()),
    }
    if beta != 0.0:
        metrics["kl"] = global_masked_mean(per_token_kl)
    return loss, metrics


def variants():
    gen = torch.Generator().manual_seed(1)
    g, b, t = 4, 12, 6
    rewards = torch.tensor([2.5, 0.0, 0.5, 2.5, 1.0, 0.0, 0.0, 3.0, 1.0, 1.0, 1.0, 1.0])  # third group all equal
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6, 5, 6, 3, 2])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    logps = -torch.rand(b, t, generator=gen) * 3
    # Old log-probs up to +-0.8 away: ratios from 0.45 to 2.2, past both clips and the delta below.
    old = logps + (torch.rand(b, t, generator=gen) - 0.5) * 1.6
    ref = logps + (torch.rand(b, t, generator=gen) - 0.5) * 0.5
    entropies = torch.rand(b, t, generator=gen) * 4
    adv, _ = advantages_grouped(rewards, g)
    ratio = torch.exp(logps - old)
    a = adv.unsqueeze(1).expand(b, t)
    m = mask.bool()
    coverage = {
        "positive advantage above 1 + epsilon_high": (m & (a > 0) & (ratio > 1 + EPS_HIGH)).sum().item(),
        "positive advantage below 1 - epsilon": (m & (a > 0) & (ratio < 1 - EPS_LOW)).sum().item(),
        "negative advantage below 1 - epsilon": (m & (a < 0) & (ratio < 1 - EPS_LOW)).sum().item(),
        "negative advantage above 1 + epsilon_high": (m & (a < 0) & (ratio > 1 + EPS_HIGH)).sum().item(),
        "negative advantage above delta 1.5": (m & (a < 0) & (ratio > 1.5)).sum().item(),
    }
    assert all(count > 0 for count in coverage.values()), coverage
    base = {"loss_type": "dapo", "beta": BETA, "delta": None, "importance_sampling_level": "token",
            "top_entropy_quantile": 1.0, "entropy_coef": 0.0, "micro_batches": 1}
    cases = [dict(base, loss_type=lt) for lt in ("grpo", "bnpo", "dr_grpo", "dapo")]
    cases += [dict(base, loss_type=lt, delta=1.5) for lt in ("grpo", "dapo")]
    cases += [dict(base, loss_type=lt, importance_sampling_level="sequence") for lt in ("grpo", "bnpo", "dapo")]
    cases += [dict(base, loss_type="grpo", importance_sampling_level="sequence", delta=1.5, beta=0.0)]
    cases += [dict(base, loss_type=lt, top_entropy_quantile=0.5) for lt in ("grpo", "bnpo")]
    cases += [dict(base, loss_type="dapo", top_entropy_quantile=0.2, beta=0.0)]
    cases += [dict(base, loss_type="dapo", entropy_coef=0.01), dict(base, loss_type="grpo", entropy_coef=0.01, top_entropy_quantile=0.5)]
    cases += [dict(base, loss_type=lt, micro_batches=2) for lt in ("grpo", "bnpo", "dr_grpo", "dapo")]
    cases += [dict(base, loss_type="bnpo", micro_batches=2, entropy_coef=0.01, top_entropy_quantile=0.5)]
    out_cases = []
    for cfg in cases:
        x = logps.clone().requires_grad_(True)
        h = entropies.clone().requires_grad_(True)
        steps = cfg["micro_batches"]
        rows = b // steps
        num_items_in_batch = mask.sum()
        total = 0.0
        metrics = None
        for k in range(steps):
            s = slice(k * rows, (k + 1) * rows)
            loss, metrics = trl_compute_loss(x[s], old[s], ref[s], adv[s], mask[s], h[s], cfg, num_items_in_batch, steps)
            total = total + loss
        total.backward()
        case = {**cfg, "loss": total.item(), "grad": x.grad.tolist(), "entropy_grad": (h.grad if h.grad is not None else torch.zeros_like(h)).tolist()}
        if steps == 1:
            case["metrics"] = metrics
        out_cases.append(case)
    overlong = []
    from trl.rewards import get_soft_overlong_punishment
    for max_len, cache in ((10, 4), (10, 0), (100, 20)):
        lengths_ = [0, 5, 6, 7, 9, 10, 11, 80, 90, 100, 101]
        overlong.append({"max_completion_len": max_len, "soft_punish_cache": cache, "lengths": lengths_,
                         "rewards": get_soft_overlong_punishment(max_len, cache)([[1] * n for n in lengths_])})
    out = {
        "num_generations": g, "epsilon": EPS_LOW, "epsilon_high": EPS_HIGH, "max_completion_length": MAX_COMPLETION_LENGTH,
        "clip_coverage": coverage, "advantages": adv.tolist(), "mask": mask.tolist(), "per_token_logps": logps.tolist(),
        "old_per_token_logps": old.tolist(), "ref_per_token_logps": ref.tolist(), "entropies": entropies.tolist(),
        "cases": out_cases, "soft_overlong_punishment": overlong,
    }
    OUT_VARIANTS.write_text(json.dumps(out) + "\n")
    print(f"wrote {OUT_VARIANTS.relative_to(ROOT)}: {len(out_cases)} cases; clip coverage {coverage}")


def advantages_grouped(rewards, g):
    grouped = rewards.view(-1, g)
    mean = grouped.mean(dim=1).repeat_interleave(g)
    std = nanstd(grouped, dim=1).repeat_interleave(g)
    return (rewards - mean) / (std + 1e-4), std


if __name__ == "__main__":
    main()
