"""Reference filtered distributions of transformers' sampling warpers, for cotlab's sampler.

Each case applies LogitsProcessorList([TemperatureLogitsWarper(t), TopKLogitsWarper(k),
TopPLogitsWarper(p)]) (the order transformers' `generate` uses; a warper is left out where
`generate` leaves it out: top_k None, top_p None or 1) to one row of fixed float32 logits, then
softmax: the tokens left with a non-zero probability and their probabilities. The logits tie
at the k-th value (TopKLogitsWarper keeps ties) and among the tokens top-p keeps; top-p
renormalises over what top-k kept. No case puts top-p's cut inside a tied group: which of its
tokens transformers keeps follows torch's unstable sort (checked below), so there is no
reference to match.

Run from the repository root in a virtualenv with torch and transformers:
    python tools/parity/make_sampling_fixtures.py
Writes crates/policy-models/tests/fixtures/sampling.json.
"""

import json
import pathlib

import torch
import transformers
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "policy-models" / "tests" / "fixtures" / "sampling.json"


def logits_with_ties(size, seed, tied):
    """Random logits with the values at the given ranks copied onto other ids: `tied` maps a
    rank (0 = largest) to how many extra ids take that rank's value."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(size, generator=generator, dtype=torch.float32) * 2.0
    order = torch.argsort(logits, descending=True).tolist()
    free = order[::-1]  # the least likely ids receive the copies
    for rank, copies in tied.items():
        for _ in range(copies):
            logits[free.pop(0)] = logits[order[rank]]
    return logits


def reference(logits, temperature, top_k, top_p):
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(torch.zeros(1, 1, dtype=torch.long), logits.clone().unsqueeze(0))[0]
    probs = scores.softmax(-1)
    kept = torch.nonzero(probs > 0).flatten().tolist()
    return kept, [float(probs[i]) for i in kept], scores


def top_p_margin(scores, top_p):
    """How far the nearest cumulative probability lies from top-p's threshold (float64): a
    case too close to it could flip between float32 and float64 arithmetic."""
    if top_p is None or top_p >= 1.0:
        return 1.0
    finite = scores[torch.isfinite(scores)].double()
    cumulative = torch.sort(finite).values.softmax(-1).cumsum(-1)
    return float((cumulative - (1 - top_p)).abs().min())


def main():
    torch.manual_seed(0)
    specs = [
        # name, vocab size, seed, {rank: extra ids with that rank's value}, temperature, top_k, top_p
        ("top_k_keeps_ties_at_the_kth_value", 40, 1, {4: 2}, 1.0, 5, None),
        ("top_p_renormalises_over_top_k", 40, 2, {}, 0.7, 6, 0.6),
        ("temperature_top_k_top_p_with_ties", 50, 3, {2: 1, 5: 2}, 1.3, 6, 0.8),
        ("top_p_keeps_a_tied_group_whole", 30, 4, {1: 3}, 1.0, None, 0.8),
        ("top_p_over_a_flat_vocabulary", 300, 5, {}, 3.0, None, 0.9),
        ("top_k_wider_than_the_fast_path_then_top_p", 300, 6, {80: 2}, 2.0, 100, 0.95),
        ("top_p_below_the_first_token_keeps_one", 40, 7, {}, 1.0, 10, 0.01),
        ("top_k_above_the_vocabulary_is_off", 20, 8, {}, 0.8, 50, None),
        ("top_k_one_with_ties_keeps_all_tied", 20, 9, {0: 2}, 1.0, 1, 0.9),
    ]
    cases = []
    for name, size, seed, tied, temperature, top_k, top_p in specs:
        logits = logits_with_ties(size, seed, tied)
        kept, probs, scores = reference(logits, temperature, top_k, top_p)
        margin = top_p_margin(scores if top_k is None else reference(logits, temperature, top_k, None)[2], top_p)
        assert margin > 1e-4, f"{name}: top-p threshold within {margin} of a cumulative probability"
        cases.append(
            {
                "name": name,
                "logits": [float(value) for value in logits],
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "kept": kept,
                "probs": probs,
            }
        )
        print(f"{name}: {len(kept)} kept")
    by_name = {case["name"]: case for case in cases}
    # The cases exercise what they are named for.
    ties = by_name["top_k_keeps_ties_at_the_kth_value"]
    assert len(ties["kept"]) == 7, ties["kept"]
    for case in cases:
        logits = case["logits"]
        for value in set(logits):
            group = [i for i, other in enumerate(logits) if other == value]
            kept = [i for i in group if i in case["kept"]]
            assert not kept or kept == group, (case["name"], "a tied group cut by top-p", group, kept)
    assert len(by_name["top_p_keeps_a_tied_group_whole"]["kept"]) > 4
    # Why no case cuts a tied group: torch's default sort leaves ties in no fixed order.
    tied = torch.zeros(1, 30)
    tied[0, [6, 14, 15, 23]] = 1.0
    print("torch's ascending sort of four tied ids:", torch.sort(tied, descending=False)[1][0, -4:].tolist())
    one = by_name["top_k_one_with_ties_keeps_all_tied"]
    assert len(one["kept"]) == 3, one["kept"]
    OUT.write_text(
        json.dumps(
            {
                "generated_by": "tools/parity/make_sampling_fixtures.py",
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "cases": cases,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {len(cases)} cases to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
