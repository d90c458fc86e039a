"""Tiny random causal-LM reward models in transformers' sequence-classification layout, and the
scores transformers gives them, for cotlab's `crates/reward-model/tests/causal_parity.rs`.

    /work/venv/bin/python tools/parity/make_causal_reward_model_fixtures.py

For each of `LlamaForSequenceClassification`, `Qwen2ForSequenceClassification` and
`GPTNeoForSequenceClassification` (num_labels = 1, pad_token_id = 0, f32, eager attention) it
writes `crates/reward-model/tests/fixtures/causal_rm_<arch>/` with `config.json`,
`model.safetensors` (transformers' `save_pretrained`) and `reference.json`: a batch of right-
and left-padded rows, one unpadded row, and one with a pad id inside the text, with their
`attention_mask` and transformers' scores (`logits[:, 0]`, read at the rightmost non-pad token).
Every weight is random (the head too), so that a wrong key or a wrong token shows.
"""

import json
import pathlib

import torch
import transformers
from transformers import (
    GPTNeoConfig,
    GPTNeoForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "reward-model" / "tests" / "fixtures"
PAD = 0
VOCAB = 48


def models():
    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, pad_token_id=PAD, num_labels=1, bos_token_id=1, eos_token_id=2)
    yield "llama", LlamaForSequenceClassification(LlamaConfig(num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, **common))
    yield "qwen2", Qwen2ForSequenceClassification(Qwen2Config(num_key_value_heads=2, rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=True, **common))
    neo = GPTNeoConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32, max_position_embeddings=64,
                       attention_types=[[["global", "local"], 1]], window_size=4, pad_token_id=PAD, num_labels=1, bos_token_id=1, eos_token_id=2)
    yield "gpt_neo", GPTNeoForSequenceClassification(neo)


def batch(generator):
    rows, masks = [], []
    width = 11
    # (padding side, real length, pad inside the text)
    for side, length, inner_pad in [("right", 7, False), ("left", 5, False), ("right", 11, False), ("left", 9, True), ("right", 3, False), ("left", 10, False)]:
        tokens = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        if inner_pad:
            tokens[length // 2] = PAD
        pads = [PAD] * (width - length)
        if side == "right":
            rows.append(tokens + pads)
            masks.append([1] * length + [0] * len(pads))
        else:
            rows.append(pads + tokens)
            masks.append([0] * len(pads) + [1] * length)
    return rows, masks


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    for name, model in models():
        model = model.float().eval()
        model.config._attn_implementation = "eager"
        # Random everything: the default init gives zero biases and unit norms, which would hide
        # a swapped or missed key; the head is scaled up so that scores differ visibly.
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            model.score.weight.mul_(3.0)
        ids, mask = batch(generator)
        with torch.no_grad():
            scores = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0]
        folder = FIXTURES / f"causal_rm_{name}"
        model.save_pretrained(folder, safe_serialization=True)
        reference = {
            "generator": f"tools/parity/make_causal_reward_model_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
            "pad_token_id": PAD,
            "input_ids": ids,
            "attention_mask": mask,
            "scores": scores.tolist(),
        }
        (folder / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{name}: {size / 1024:.0f} KiB, scores {[round(s, 4) for s in scores.tolist()]}")


if __name__ == "__main__":
    main()
