"""Tiny random RoBERTa checkpoints (RobertaForSequenceClassification with num_labels = 1, the
reward model's shape) and the scores transformers gives, for cotlab's parity tests.

Cases: a full checkpoint with its regression head; and a base checkpoint saved from
RobertaForMaskedLM (no classification head, an lm_head instead), as distilroberta-base is, to
test that the head is initialised when absent.

    python tools/parity/make_reward_model_fixtures.py
"""

import json
import pathlib
import shutil

import torch
import transformers
from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "reward-model" / "tests" / "fixtures"


def config(**extra):
    return RobertaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        initializer_range=0.2,
        hidden_act="gelu",
        **extra,
    )


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    torch.manual_seed(0)
    # Two rows: one full, one right-padded with the pad id 1 (RoBERTa pads on the right).
    input_ids = torch.tensor([[0, 5, 17, 33, 9, 12, 2], [0, 40, 8, 2, 1, 1, 1]])
    attention_mask = (input_ids != 1).long()

    model = RobertaForSequenceClassification(config(num_labels=1, problem_type="regression")).eval()
    folder = OUT / "roberta_regressor"
    model.save_pretrained(folder, safe_serialization=True)
    with torch.no_grad():
        scores = model(input_ids=input_ids, attention_mask=attention_mask).logits
    (folder / "reference.json").write_text(json.dumps({
        "generated_by": "tools/parity/make_reward_model_fixtures.py",
        "transformers_version": transformers.__version__,
        "input_ids": input_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "scores": scores[:, 0].tolist(),
    }) + "\n")

    base = RobertaForMaskedLM(config()).eval()
    base_folder = OUT / "roberta_base_mlm"
    base.save_pretrained(base_folder, safe_serialization=True)
    for folder in (OUT / "roberta_regressor", base_folder):
        print(folder.name, sorted(p.name for p in folder.iterdir()))


if __name__ == "__main__":
    main()
