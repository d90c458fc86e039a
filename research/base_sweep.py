"""Which synthetic-arithmetic setup lets a tiny GPT-Neo learn an imperfect-but-useful base quickly?

A PyTorch prototype of the default study's supervised base (the same GPT-Neo shape as the
`tiny_gpt_neo` preset, the same question/solution format, digits as single tokens), used to pick
the default study's task sizes, loss and step counts before spending burn CPU time on them.
Prints greedy held-out accuracy against supervised steps for each setting.

    python research/base_sweep.py --ops "+-*" --max-operand 20 --steps 600 --loss full
"""
import argparse, random, re, time
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from problems import CUE, Task, generate, prompt

def problem(p):
    """The study's supervised text of problem `p`: (prompt up to the cue line, solution with
    `#### N`, answer), as `Template::Plain` writes it."""
    return f"{prompt(p.question)}\n{CUE}\n", f"{p.solution}\n#### {p.answer}", str(p.answer)

TOKEN = re.compile(r"[A-Za-z']+|\d| |\n|.")

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ops", default="+-*")
    p.add_argument("--min-operand", type=int, default=1)
    p.add_argument("--max-operand", type=int, default=20)
    p.add_argument("--max-ops", type=int, default=2)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=["completion", "full"], default="completion")
    p.add_argument("--per-doc", type=int, default=3, help="problems per training sequence (loss=full)")
    p.add_argument("--vary-doc", action="store_true", help="1..per-doc problems per sequence")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    task = Task(min_operand=a.min_operand, max_operand=a.max_operand, max_operations=a.max_ops, operators=a.ops)
    test, train = (list(map(problem, split)) for split in generate(rng, task, 200, a.train))
    vocab = {"<eos>": 0}
    for pr, sol, _ in train + test:
        for t in TOKEN.findall(pr + sol):
            vocab.setdefault(t, len(vocab))
    enc = lambda s: [vocab[t] for t in TOKEN.findall(s)]
    inv = {i: t for t, i in vocab.items()}
    cfg = GPTNeoConfig(vocab_size=len(vocab), max_position_embeddings=320, hidden_size=a.hidden, num_layers=a.layers,
                       num_heads=4, attention_types=[[["global", "local"], a.layers // 2]], window_size=128,
                       bos_token_id=0, eos_token_id=0)
    model = GPTNeoForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a.steps // 20)) * (0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * min(1.0, s / a.steps)))))
    def batch():
        rows, masks = [], []
        for _ in range(a.batch):
            if a.loss == "full":
                ids, m = [0], [0]
                for _ in range(rng.randint(1, a.per_doc) if a.vary_doc else a.per_doc):
                    pr, sol, _ = rng.choice(train)
                    x = enc(pr); y = enc(sol) + enc("\n\n")
                    ids += x + y; m += [1] * (len(x) + len(y))
            else:
                k = rng.randint(0, 2)
                ctx = []
                for _ in range(k):
                    pr, sol, _ = rng.choice(train)
                    ctx += enc(pr + sol + "\n\n")
                pr, sol, _ = rng.choice(train)
                x = [0] + ctx + enc(pr); y = enc(sol) + [0]
                ids = x + y; m = [0] * len(x) + [1] * len(y)
            rows.append(ids[:320]); masks.append(m[:320])
        L = max(map(len, rows))
        ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
        msk = torch.tensor([m + [0] * (L - len(m)) for m in masks])
        att = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
        return ids, msk, att
    def evaluate(show_errors=False):
        shown = [0]
        model.eval(); correct = 0
        with torch.no_grad():
            for i in range(0, len(test), 50):
                chunk = test[i:i + 50]
                prompts = [[0] + enc(pr) for pr, _, _ in chunk]
                L = max(map(len, prompts))
                ids = torch.tensor([[0] * (L - len(x)) + x for x in prompts])
                att = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in prompts])
                out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=48, do_sample=False, pad_token_id=0, eos_token_id=0)
                for (pr, sol, ans), row in zip(chunk, out[:, L:].tolist()):
                    text = "".join(inv[t] for t in row if t != 0)
                    m = re.search(r"#### (-?\d+)", text.split("\n\n")[0])
                    correct += bool(m and m.group(1) == ans)
                    if show_errors and not (m and m.group(1) == ans) and shown[0] < 6:
                        shown[0] += 1
                        print("  wrong:", repr(pr.split("\n")[0]), "->", repr(text.split("\n\n")[0]))
        model.train()
        return correct / len(test)
    t0 = time.time()
    for s in range(1, a.steps + 1):
        ids, msk, att = batch()
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        tgt = ids[:, 1:]; m = msk[:, 1:].float()
        loss = (torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none") * m.reshape(-1)).sum() / m.sum()
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        if s % a.eval_every == 0 or s == a.steps:
            print(f"step {s} loss {loss.item():.3f} acc {evaluate(s == a.steps):.3f} ({time.time() - t0:.0f} s)", flush=True)
    print("example:", test[0])

if __name__ == "__main__":
    main()
