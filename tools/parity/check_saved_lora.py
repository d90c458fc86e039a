"""Checks that LoRA models saved by cotlab load in PEFT: the base with the adapters applied by
`peft.PeftModel.from_pretrained` gives the logits of cotlab's merged checkpoint (loaded by
transformers) and cotlab's own logits.

    COTLAB_KEEP_LORA=/tmp/cotlab-lora cargo test -p policy-models --test lora saved_adapters
    python tools/parity/check_saved_lora.py /tmp/cotlab-lora

Each `lora_<base>` folder holds cotlab's save (config.json, the merged model.safetensors, and
`adapter/` with adapter_config.json and adapter_model.safetensors) of the tiny fixture `<base>`
with random rank-2 adapters, and `cotlab_logits.json`.

Result (peft 0.21.2, transformers 5.24.0, torch 2.15.0, CPU):

    gpt_neo: PEFT vs merged 4.9e-06, PEFT vs cotlab 1.0e-05 (adapters move the logits by 5.0e+00)
    qwen2_tied: PEFT vs merged 8.6e-06, PEFT vs cotlab 1.0e-05 (adapters move the logits by 6.5e+00)

(and `tests/lora.rs` itself: PEFT's fixture adapters in cotlab, max |logit difference| 3.5e-6
for gpt_neo and 7.2e-6 for qwen2_tied).
"""

import json
import pathlib
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "policy-models" / "tests" / "fixtures"


def logits_of(model, reference):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(reference["input_ids"]),
            attention_mask=torch.tensor(reference["attention_mask"]),
            position_ids=torch.tensor(reference["position_ids"]),
        ).logits


def main(saved_root):
    folders = sorted(pathlib.Path(saved_root).glob("lora_*"))
    assert folders, f"no lora_* folders in {saved_root}; run the cargo test with COTLAB_KEEP_LORA first"
    for folder in folders:
        name = folder.name.removeprefix("lora_")
        reference = json.loads((FIXTURES / name / "reference.json").read_text())
        real = torch.tensor(reference["attention_mask"]).bool()
        base = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32).eval()
        base_logits = logits_of(base, reference)
        peft_model = PeftModel.from_pretrained(base, folder / "adapter").eval()
        peft_logits = logits_of(peft_model, reference)
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        merged_logits = logits_of(merged, reference)
        cotlab = torch.tensor(json.loads((folder / "cotlab_logits.json").read_text())).reshape(peft_logits.shape)
        versus_merged = (peft_logits - merged_logits).abs()[real].max().item()
        versus_cotlab = (peft_logits - cotlab).abs()[real].max().item()
        moved = (peft_logits - base_logits).abs()[real].max().item()
        print(f"{name}: PEFT vs merged {versus_merged:.1e}, PEFT vs cotlab {versus_cotlab:.1e} (adapters move the logits by {moved:.1e})")
        assert versus_merged < 1e-4 and versus_cotlab < 1e-4 and moved > 1e-3


if __name__ == "__main__":
    main(sys.argv[1])
