"""Reference numbers for cotlab's training utilities, from PyTorch and transformers:
torch.optim.AdamW updates with transformers' Trainer parameter groups (weight decay on the
names Trainer.get_decay_parameter_names returns, none on biases and norm weights),
torch.nn.utils.clip_grad_norm_ (global norm), and transformers' get_cosine_schedule_with_warmup.

Run from the repository root in a virtualenv with torch and transformers:
    python tools/parity/make_optim_fixtures.py
Writes crates/policy-models/tests/fixtures/optim.json.
"""

import json
import pathlib

import torch
from transformers import Trainer, get_cosine_schedule_with_warmup

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "policy-models" / "tests" / "fixtures" / "optim.json"


class Toy(torch.nn.Module):
    """cotlab's test module: a weight, a bias, a LayerNorm (left out of decay by its type) and an
    RMSNorm named `final_norm` (left out by its name)."""

    def __init__(self, weight, bias, norm_values):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = torch.nn.Parameter(bias.clone())
        self.ln = torch.nn.LayerNorm(4)
        self.final_norm = torch.nn.RMSNorm(4)
        with torch.no_grad():
            self.ln.weight.copy_(norm_values["ln.gamma"])
            self.ln.bias.copy_(norm_values["ln.beta"])
            self.final_norm.weight.copy_(norm_values["final_norm.gamma"])


# cotlab (burn) names of the torch parameters.
BURN_NAMES = {"weight": "weight", "bias": "bias", "ln.weight": "ln.gamma", "ln.bias": "ln.beta", "final_norm.weight": "final_norm.gamma"}


def main():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=generator)
    bias = torch.randn(4, generator=generator)
    grads = [(torch.randn(3, 4, generator=generator), torch.randn(4, generator=generator)) for _ in range(5)]
    initial = {"weight": weight.tolist(), "bias": bias.tolist()}
    norm_names = ["ln.gamma", "ln.beta", "final_norm.gamma"]
    norm_values = {name: torch.randn(4, generator=generator) for name in norm_names}
    norm_grads = [{name: torch.randn(4, generator=generator) for name in norm_names} for _ in range(5)]
    initial.update({name: value.tolist() for name, value in norm_values.items()})

    # AdamW with non-default settings, a learning rate that changes every step, and the parameter
    # groups transformers' Trainer.create_optimizer builds: weight decay only on the names
    # get_decay_parameter_names returns (it reads no trainer state, so no Trainer is built).
    toy = Toy(weight, bias, norm_values)
    decay_names = Trainer.get_decay_parameter_names(None, toy)
    settings = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}
    named = dict(toy.named_parameters())
    groups = [
        {"params": [p for n, p in named.items() if n in decay_names], "weight_decay": settings["weight_decay"]},
        {"params": [p for n, p in named.items() if n not in decay_names], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.01, betas=(settings["beta1"], settings["beta2"]), eps=settings["eps"])
    learning_rates = [0.01, 0.02, 0.005, 0.01, 0.03]
    adamw_steps = []
    for step, (lr, (grad_w, grad_b)) in enumerate(zip(learning_rates, grads)):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, param in named.items():
            burn_name = BURN_NAMES[name]
            param.grad = {"weight": grad_w, "bias": grad_b}.get(burn_name, norm_grads[step].get(burn_name)).clone()
        optimizer.step()
        adamw_steps.append({BURN_NAMES[n]: p.detach().tolist() for n, p in named.items()})
    w, b = toy.weight, toy.bias

    # Global-norm clipping, over every parameter's gradient of step 0 (x 3).
    for name, param in named.items():
        burn_name = BURN_NAMES[name]
        param.grad = {"weight": grads[0][0], "bias": grads[0][1]}.get(burn_name, norm_grads[0].get(burn_name)).clone() * 3
    total_norm = torch.nn.utils.clip_grad_norm_(toy.parameters(), max_norm=1.0).item()
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
                "grads": [{"weight": gw.tolist(), "bias": gb.tolist(), **{n: g.tolist() for n, g in ng.items()}} for (gw, gb), ng in zip(grads, norm_grads)],
                "adamw_settings": settings,
                "decay_parameters": sorted(BURN_NAMES[n] for n in decay_names),
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
