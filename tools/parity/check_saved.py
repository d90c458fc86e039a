"""Checks that checkpoints saved by cotlab load in transformers and give the reference logits
(policies) or scores (the reward model).

    COTLAB_KEEP_SAVED=/tmp/cotlab-saved cargo test -p policy-models --test generation a_saved_model
    COTLAB_KEEP_SAVED=/tmp/cotlab-saved cargo test -p reward-model --test parity
    COTLAB_KEEP_SAVED=/tmp/cotlab-saved cargo test -p reward-model --test causal_parity a_saved_model
    python tools/parity/check_saved.py /tmp/cotlab-saved
"""

import json
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "policy-models" / "tests" / "fixtures"
REWARD_FIXTURES = ROOT / "crates" / "reward-model" / "tests" / "fixtures"


def main(saved_root):
    for folder in sorted(pathlib.Path(saved_root).iterdir()):
        if folder.name == "roberta_regressor" or folder.name.startswith("causal_rm_"):
            reference = json.loads((REWARD_FIXTURES / folder.name / "reference.json").read_text())
            model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                scores = model(
                    input_ids=torch.tensor(reference["input_ids"]),
                    attention_mask=torch.tensor(reference["attention_mask"]),
                ).logits[:, 0]
            worst = (scores - torch.tensor(reference["scores"])).abs().max().item()
            print(f"{folder.name}: transformers loads cotlab's save; max |score difference| {worst:.2e}")
            assert worst < 1e-4
            continue
        reference = json.loads((FIXTURES / folder.name / "reference.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor(reference["input_ids"]),
                attention_mask=torch.tensor(reference["attention_mask"]),
                position_ids=torch.tensor(reference["position_ids"]),
            ).logits
        expected = torch.tensor(reference["logits"])
        real = torch.tensor(reference["attention_mask"]).bool()
        worst = (logits - expected).abs()[real].max().item()
        print(f"{folder.name}: transformers loads cotlab's save; max |logit difference| {worst:.2e}")
        assert worst < 1e-4


if __name__ == "__main__":
    main(sys.argv[1])
