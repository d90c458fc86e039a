"""PEFT LoRA adapters on the tiny parity checkpoints, and the logits PEFT computes with them,
for cotlab's `tests/lora.rs` (cotlab loads PEFT's files and must give the same logits).

    python tools/parity/make_lora_fixtures.py

For each base in crates/policy-models/tests/fixtures/{gpt_neo,qwen2_tied} it writes
`lora_<base>/adapter_config.json`, `adapter_model.safetensors` (rank 2, alpha 4, every
attention and MLP projection, both factors random so that the update is not zero) and
`reference.json` (the base's batch and PeftModel's logits).

It also checks how transformers treats a directory holding both merged weights and
adapter files: `AutoModelForCausalLM.from_pretrained(dir)` loads the weights *and then applies
the adapters on top* (transformers' `maybe_load_adapters`), so the update counts twice. cotlab
therefore writes a LoRA model's adapters into `adapter/` under the checkpoint directory, where
transformers does not look (`PeftModel.from_pretrained(base, dir / "adapter")` loads them).

Run with peft 0.21.2, transformers 5.24.0, torch 2.15.0 (CPU): the adapters move the logits by
up to 5.7 (gpt_neo) and 5.5 (qwen2_tied); the merged weights alone match PEFT within 7e-6, and
with the adapter files beside them transformers' logits move by another 5.0 and 4.7.
"""

import json
import pathlib
import tempfile

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "policy-models" / "tests" / "fixtures"

TARGETS = {
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
    "qwen2_tied": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def logits_of(model, reference):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(reference["input_ids"]),
            attention_mask=torch.tensor(reference["attention_mask"]),
            position_ids=torch.tensor(reference["position_ids"]),
        ).logits


def main():
    for index, (name, targets) in enumerate(TARGETS.items()):
        torch.manual_seed(100 + index)
        reference = json.loads((FIXTURES / name / "reference.json").read_text())
        base = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32).eval()
        base_logits = logits_of(base, reference)
        # init_lora_weights=False draws both factors at random (PEFT's default zeroes B).
        config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(base, config).eval()
        logits = logits_of(model, reference)
        out = FIXTURES / f"lora_{name}"
        model.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)  # PEFT's model card template
        # The base is a sibling fixture; a machine-specific path would not belong in the repository.
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = f"../{name}"
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])  # saved from a set
        (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        real = torch.tensor(reference["attention_mask"]).bool()
        moved = (logits - base_logits).abs()[real].max().item()
        print(f"{name}: the adapters move the logits by up to {moved:.3e}")
        assert moved > 1e-3
        (out / "reference.json").write_text(
            json.dumps(
                {
                    "generated_by": "tools/parity/make_lora_fixtures.py",
                    "peft_version": peft.__version__,
                    "transformers_version": transformers.__version__,
                    "torch_version": torch.__version__,
                    "input_ids": reference["input_ids"],
                    "attention_mask": reference["attention_mask"],
                    "position_ids": reference["position_ids"],
                    "logits": logits.tolist(),
                }
            )
        )

        # Merged weights and adapter files in one directory: transformers applies the adapters
        # again on top of the merged weights.
        with tempfile.TemporaryDirectory() as scratch:
            merged = get_peft_model(
                AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32), config
            )
            merged.load_adapter(out, adapter_name="default")
            merged = merged.merge_and_unload().eval()
            merged.save_pretrained(scratch)
            twice = AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).eval()
            once = logits_of(twice, reference)
            model.save_pretrained(scratch)
            loaded = AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).eval()
            doubled = (logits_of(loaded, reference) - once).abs()[real].max().item()
            print(f"{name}: merged weights alone match PEFT within {(once - logits).abs()[real].max().item():.1e}; "
                  f"with adapter files beside them transformers' logits move by {doubled:.3e}")


if __name__ == "__main__":
    main()
