"""transformers' logits of the tiny parity checkpoints computed in bfloat16, for the bf16 compute
option of cotlab's models (CausalLm::with_compute_dtype).

Reads each crates/policy-models/tests/fixtures/<case>/ (made by make_fixtures.py), loads it with
torch_dtype=bfloat16, runs the same left-padded batch as reference.json, and writes
reference_bf16.json beside it: the logits (as f32) and, for scale, the largest difference from the
f32 reference.json at real positions. bf16 keeps 8 significant bits, so cotlab's bf16 logits are
compared with these within a tolerance, not bit for bit.

Run from the repository root in a virtualenv with torch and transformers:
    python tools/parity/make_bf16_fixtures.py
"""

import json
import pathlib

import torch
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "policy-models" / "tests" / "fixtures"
CASES = ["gpt_neo", "qwen2_tied", "qwen2_bf16_sharded", "llama3"]


def main():
    for case in CASES:
        folder = FIXTURES / case
        reference = json.loads((folder / "reference.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        ids = torch.tensor(reference["input_ids"])
        mask = torch.tensor(reference["attention_mask"])
        # As make_fixtures.py: positions skip the padding, which gets position 1.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        f32 = torch.tensor(reference["logits"])
        real = mask.bool()
        gap = (logits - f32).abs()[real].max().item()
        out = {"generated_by": "tools/parity/make_bf16_fixtures.py", "logits": [[[round(float(x), 5) for x in row] for row in seq] for seq in logits], "max_abs_diff_from_f32": gap}
        (folder / "reference_bf16.json").write_text(json.dumps(out) + "\n")
        print(f"{case}: bf16 vs f32 max |diff| = {gap:.4f}, max |logit| = {f32.abs().max().item():.3f}")


if __name__ == "__main__":
    main()
