"""Reference outputs for cotlab's GGUF loading, from transformers' own GGUF loader and gguf-py.

Writes, under crates/policy-models/tests/fixtures/gguf/:
  - blocks.json: random blocks of every quantized type cotlab reads (Q4_0, Q4_1, Q5_0, Q5_1,
    Q8_0, Q4_K, Q5_K, Q6_K) as hex bytes, with the values gguf-py's `quants.dequantize` gives
    (llama.cpp's reference dequantization transcribed in numpy). Scale fields are set to finite
    f16 values; every other byte is random.
  - smollm2.json: for the shared SmolLM2-135M-Instruct Q4_1 GGUF, as transformers loads it
    (`from_pretrained(dir, gguf_file=...)`, dequantized to f32):
      * tokenizer: ids of GSM8K test questions (`tokenizer(text)`), and of chat prompts rendered
        with the file's template (`apply_chat_template(..., tokenize=False,
        add_generation_prompt=True)`, then tokenized without added special tokens, as TRL does);
      * logits of one rendered chat prompt (104 tokens): at every position, the logits of 256
        fixed vocabulary ids, the log-sum-exp over the whole vocabulary and the argmax, computed in
        float32 and again in float64 (the same dequantized weights, `model.double()`). Two float32
        implementations differ by their summation order: transformers' float32 logits are up to
        6.8e-5 from the float64 ones here, so cotlab is held to the float64 values;
      * the greedy continuation of that prompt (16 tokens, transformers' `generate`).

Run from the repository root in a virtualenv with torch, transformers, gguf and accelerate:
    python tools/parity/make_gguf_fixtures.py
"""

import json
import pathlib

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGML_QUANT_SIZES
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "policy-models" / "tests" / "fixtures" / "gguf"
SHARED = ROOT.parent / "shared"
MODEL_DIR = SHARED / "models" / "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Byte offsets of the f16 scale fields in each block (ggml-common.h).
SCALE_OFFSETS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def blocks():
    rng = np.random.default_rng(0)
    cases = {}
    for name, offsets in SCALE_OFFSETS.items():
        qtype = GGMLQuantizationType[name]
        block_values, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(3, block_bytes), dtype=np.uint8)
        for row in raw:
            for offset in offsets:
                scale = np.float16(rng.uniform(-0.05, 0.05))
                row[offset:offset + 2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
        values = dequantize(raw.reshape(-1), qtype).reshape(-1)
        assert values.size == 3 * block_values and np.isfinite(values).all()
        cases[name] = {"hex": raw.reshape(-1).tobytes().hex(), "values": [float(v) for v in values]}
    return cases


def smollm2():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    with open(SHARED / "datasets" / "gsm8k" / "test.jsonl") as lines:
        questions = [json.loads(line)["question"] for line, _ in zip(lines, range(24))]
    plain = [{"text": q, "ids": tokenizer(q)["input_ids"]} for q in questions]
    chats = []
    for question in questions[:6]:
        messages = [{"role": "user", "content": question + "\nGive the answer as a number."}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chats.append({"question": question + "\nGive the answer as a number.", "text": text,
                      "ids": tokenizer(text, add_special_tokens=False)["input_ids"]})
    ids = chats[0]["ids"]
    rng = np.random.default_rng(1)
    columns = sorted(rng.choice(model.config.vocab_size, size=256, replace=False).tolist())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        exact = model.double()(torch.tensor([ids])).logits[0]
    return {
        "model": f"{MODEL_DIR.name}/{GGUF_FILE}",
        "plain": plain,
        "chat": chats,
        "logits": {
            "ids": ids,
            "columns": columns,
            "values": logits[:, columns].tolist(),
            "logsumexp": torch.logsumexp(logits, dim=-1).tolist(),
            "argmax": logits.argmax(dim=-1).tolist(),
            "values_f64": exact[:, columns].tolist(),
            "logsumexp_f64": torch.logsumexp(exact, dim=-1).tolist(),
        },
        "greedy": greedy,
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "blocks.json").write_text(json.dumps(blocks()))
    (OUT / "smollm2.json").write_text(json.dumps(smollm2()))


if __name__ == "__main__":
    main()
