"""PyTorch + transformers reference for `cargo xtask bench`: the same GPT-Neo shape and
settings, on the same machine, with 2 threads by default.

Prints one JSON object: {"train_tokens_per_s", "gen_tokens_per_s", "torch_version", ...}.
    python tools/bench/torch_ref.py --hidden-size 128 --num-layers 4 --num-heads 4 --vocab-size 512 \
        --batch-size 16 --seq-len 128 --gen-batch-size 32 --prompt-len 32 --new-tokens 64
"""

import argparse
import json
import time

import torch
import transformers
from transformers import GPTNeoConfig, GPTNeoForCausalLM


def main():
    parser = argparse.ArgumentParser()
    for name, default in [
        ("hidden-size", 128), ("num-layers", 4), ("num-heads", 4), ("vocab-size", 512),
        ("batch-size", 16), ("seq-len", 128), ("gen-batch-size", 32), ("prompt-len", 32),
        ("new-tokens", 64), ("train-steps", 5), ("threads", 2),
    ]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--top-p", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=args.vocab_size,
        max_position_embeddings=max(256, args.seq_len, args.prompt_len + args.new_tokens),
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        attention_types=[[["global", "local"], args.num_layers // 2]],
        window_size=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPTNeoForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)  # cotlab's default (transformers')
    ids = torch.randint(2, args.vocab_size, (args.batch_size, args.seq_len))

    def train_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for _ in range(2):
        train_step()
    start = time.perf_counter()
    for _ in range(args.train_steps):
        train_step()
    train_seconds = (time.perf_counter() - start) / args.train_steps

    model.eval()
    prompts = torch.randint(2, args.vocab_size, (args.gen_batch_size, args.prompt_len))
    mask = torch.ones_like(prompts)

    def generate():
        with torch.no_grad():
            return model.generate(
                input_ids=prompts, attention_mask=mask, do_sample=True, top_p=args.top_p,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=1,
            )

    generate()
    start = time.perf_counter()
    out = generate()
    gen_seconds = time.perf_counter() - start
    assert out.shape[1] == args.prompt_len + args.new_tokens
    print(json.dumps({
        "train_tokens_per_s": args.batch_size * args.seq_len / train_seconds,
        "gen_tokens_per_s": args.gen_batch_size * args.new_tokens / gen_seconds,
        "train_seconds_per_step": train_seconds,
        "gen_seconds": gen_seconds,
        "threads": args.threads,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
