"""Builds tiny random checkpoints of each policy architecture with transformers, and the
reference outputs cotlab's Rust implementations must reproduce.

For each architecture this saves, under crates/policy-models/tests/fixtures/<name>/:
  - the checkpoint exactly as `save_pretrained` writes it (config.json, generation_config.json,
    model.safetensors or model-0000x-of-0000y.safetensors + model.safetensors.index.json);
  - reference.json: a left-padded batch (input_ids, attention_mask, position_ids that skip the
    padding), the logits at every real position, and a greedy continuation computed with full
    forward passes (checked against transformers' own `generate`).

Cases: GPT-Neo (global and local attention, tied head), Qwen2 with a tied head in f32, Qwen2
stored in bf16 and sharded with an untied head, and Llama with llama3 rope scaling and
grouped-query attention. Weights are drawn with a larger initialiser range than the default so
that logits differ clearly between tokens (greedy ties would make the test meaningless).

Run from the repository root in a virtualenv with torch and transformers (tools/requirements.txt):
    python tools/parity/make_fixtures.py
"""

import json
import pathlib
import shutil

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    GPTNeoConfig,
    LlamaConfig,
    Qwen2Config,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "policy-models" / "tests" / "fixtures"

VOCAB = 128
SEQ = 12
PAD = 4  # left padding of the second row
NEW_TOKENS = 8


def gpt_neo():
    return GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=5,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )


def qwen2(tied):
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )


def llama3():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )


CASES = {
    # name: (config, save dtype, max shard size)
    "gpt_neo": (gpt_neo, torch.float32, None),
    "qwen2_tied": (lambda: qwen2(True), torch.float32, None),
    "qwen2_bf16_sharded": (lambda: qwen2(False), torch.bfloat16, "20KB"),
    "llama3": (llama3, torch.float32, None),
}


def batch():
    generator = torch.Generator().manual_seed(1234)
    # Ids 3.. so no row starts with bos/eos/pad by accident.
    input_ids = torch.randint(3, VOCAB, (2, SEQ), generator=generator)
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[1, :PAD] = 0
    input_ids[1, :PAD] = 0  # the pad id; its embedding must not matter
    return input_ids, attention_mask


def position_ids_for(attention_mask):
    # As transformers' generate does: count real tokens; padding gets position 1 (never read).
    position_ids = attention_mask.cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def greedy(model, input_ids, attention_mask, new_tokens):
    """Greedy decoding with full forward passes: the definition the Rust test checks."""
    ids, mask = input_ids, attention_mask
    out = []
    for _ in range(new_tokens):
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)
        ).logits
        next_ids = logits[:, -1, :].argmax(-1)
        top2 = logits[:, -1, :].topk(2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1]).min().item()
        assert gap > 1e-3, f"greedy tie risk: top-2 logit gap {gap}"
        out.append(next_ids)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)[:, None]], dim=1)
    return torch.stack(out, dim=1)


def main():
    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    input_ids, attention_mask = batch()
    position_ids = position_ids_for(attention_mask)
    for case_index, (name, (make_config, dtype, shard)) in enumerate(CASES.items()):
        torch.manual_seed(case_index)
        config = make_config()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        folder = OUT / name
        model.to(dtype).save_pretrained(
            folder, safe_serialization=True, **({"max_shard_size": shard} if shard else {})
        )
        # Reference outputs come from the saved weights, loaded back in f32, so a bf16
        # checkpoint is compared with the same rounded weights cotlab reads.
        reference_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = reference_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).logits
        continuation = greedy(reference_model, input_ids, attention_mask, NEW_TOKENS)
        generated = reference_model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )[:, SEQ:]
        assert torch.equal(generated, continuation), (name, generated, continuation)
        reference = {
            "generated_by": "tools/parity/make_fixtures.py",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "input_ids": input_ids.tolist(),
            "attention_mask": attention_mask.tolist(),
            "position_ids": position_ids.tolist(),
            # [B, T, V]; rows at padded positions are meaningless and not compared.
            "logits": [[[round(float(x), 7) for x in row] for row in seq] for seq in logits],
            "greedy_new_tokens": continuation.tolist(),
        }
        (folder / "reference.json").write_text(json.dumps(reference) + "\n")
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{name}: {sorted(p.name for p in folder.iterdir())}, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
