"""Reference numbers for cotlab's training utilities, from PyTorch and transformers:
torch.optim.AdamW updates, torch.nn.utils.clip_grad_norm_ (global norm), and
transformers' get_cosine_schedule_with_warmup.

Run from the repository root in a virtualenv with torch and transformers:
    python tools/parity/make_optim_fixtures.py
Writes crates/policy-models/tests/fixtures/optim.json.
"""

import json
import pathlib

import torch
from transformers import get_cosine_schedule_with_warmup

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "policy-models" / "tests" / "fixtures" / "optim.json"


def main():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=generator)
    bias = torch.randn(4, generator=generator)
    grads = [(torch.randn(3, 4, generator=generator), torch.randn(4, generator=generator)) for _ in range(5)]
    initial = {"weight": weight.tolist(), "bias": bias.tolist()}

    # AdamW with non-default settings and a learning rate that changes every step.
    w = torch.nn.Parameter(weight.clone())
    b = torch.nn.Parameter(bias.clone())
    settings = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}
    optimizer = torch.optim.AdamW(
        [w, b], lr=0.01, betas=(settings["beta1"], settings["beta2"]), eps=settings["eps"], weight_decay=settings["weight_decay"]
    )
    learning_rates = [0.01, 0.02, 0.005, 0.01, 0.03]
    adamw_steps = []
    for lr, (grad_w, grad_b) in zip(learning_rates, grads):
        for group in optimizer.param_groups:
            group["lr"] = lr
        w.grad, b.grad = grad_w.clone(), grad_b.clone()
        optimizer.step()
        adamw_steps.append({"weight": w.detach().tolist(), "bias": b.detach().tolist()})

    # Global-norm clipping.
    w.grad, b.grad = grads[0][0].clone() * 3, grads[0][1].clone() * 3
    total_norm = torch.nn.utils.clip_grad_norm_([w, b], max_norm=1.0).item()
    clipped = {"weight": w.grad.tolist(), "bias": b.grad.tolist(), "total_norm": total_norm}

    # Warmup + cosine schedule.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=10)
    schedule = []
    for _ in range(12):
        schedule.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    OUT.write_text(
        json.dumps(
            {
                "generated_by": "tools/parity/make_optim_fixtures.py",
                "torch_version": torch.__version__,
                "initial": initial,
                "grads": [{"weight": gw.tolist(), "bias": gb.tolist()} for gw, gb in grads],
                "adamw_settings": settings,
                "learning_rates": learning_rates,
                "adamw_steps": adamw_steps,
                "clip": {"max_norm": 1.0, "scale": 3.0, **clipped},
                "schedule": {"learning_rate": 1e-3, "warmup_steps": 3, "total_steps": 10, "rates": schedule},
            }
        )
        + "\n"
    )
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
