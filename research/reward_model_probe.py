"""Can a tiny RoBERTa reward model learn the default study's comparisons? A PyTorch probe of the
same task, model shape and loss as cotlab's tiny reward model, to tell a learnability limit from
a cotlab problem.

Comparisons as crates/reward-model/src/comparisons.rs builds them (plain template): chosen = a
correct worked solution; rejected = a corrupted step with the error propagated, a wrong final
answer after a correct derivation, or a broken format (marker dropped, or `The answer is N.`).
Model: transformers' RobertaForSequenceClassification, one output, Bradley-Terry loss, AdamW,
warmup + cosine. Prints held-out pairwise accuracy per kind of rejected answer.

    python research/reward_model_probe.py --hidden 64 --layers 2 --steps 1500
"""
import argparse, math, random, re, time
import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

def problem(rng):
    ops = rng.randint(1, 2)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    o1 = rng.choice("+-")
    r1 = a + b if o1 == "+" else a - b
    if ops == 1:
        return f"What is {a} {o1} {b}?", [(a, o1, b, r1)], r1
    c, o2 = rng.randint(1, 9), rng.choice("+-")
    if rng.random() < 0.5:  # (a o1 b) o2 c
        r2 = r1 + c if o2 == "+" else r1 - c
        return f"What is {a} {o1} {b} {o2} {c}?", [(a, o1, b, r1), (r1, o2, c, r2)], r2
    # c o2 (a o1 b)
    r2 = c + r1 if o2 == "+" else c - r1
    return f"What is {c} {o2} ({a} {o1} {b})?", [(a, o1, b, r1), (c, o2, r1, r2)], r2

def text(steps, answer, ending="marker"):
    body = "\n".join(f"{x} {o} {y} = {z}" for x, o, y, z in steps)
    tail = {"marker": f"\n#### {answer}", "free": f"\nThe answer is {answer}.", "none": ""}[ending]
    return "A: Let's break it down.\n" + body + tail

def nearby(rng, v):
    while True:
        d = rng.randint(-5, 5)
        if d:
            return v + d

def corrupt(rng, steps):
    k = rng.randrange(len(steps))
    out = list(steps)
    x, o, y, z = out[k]
    wrong = nearby(rng, z)
    out[k] = (x, o, y, wrong)
    repl = {z: wrong}
    for j in range(k + 1, len(out)):
        x, o, y, z = out[j]
        x2, y2 = repl.get(x, x), repl.get(y, y)
        z2 = x2 + y2 if o == "+" else x2 - y2
        out[j] = (x2, o, y2, z2)
        repl[z] = z2
    return out, out[-1][3]

def pairs(rng, n, per):
    result = []
    for i in range(n):
        q, steps, ans = problem(rng)
        chosen = text(steps, ans)
        for k in range(per):
            kind = ["corrupted_step", "wrong_answer", "broken_format"][(i + k) % 3]
            if kind == "corrupted_step":
                s2, a2 = corrupt(rng, steps)
                rejected = text(s2, a2) if a2 != ans else text(steps, nearby(rng, ans))
            elif kind == "wrong_answer":
                rejected = text(steps, nearby(rng, ans))
            else:
                rejected = text(steps, ans, "free" if rng.random() < 0.5 else "none")
            result.append((q, chosen, rejected, kind))
    return result

TOKEN = re.compile(r"\d|[A-Za-z]+|\n|[^\sA-Za-z\d]")

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    train, test = pairs(rng, 4000, 2), pairs(rng, 400, 1)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    def enc(q, c):
        ids = [1] + [vocab.setdefault(t, len(vocab)) for t in TOKEN.findall(q + "\n" + c)] + [2]
        return ids
    for q, c, r, _ in train + test:
        enc(q, c); enc(q, r)
    cfg = RobertaConfig(vocab_size=len(vocab) + 8, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
                        intermediate_size=2 * a.hidden, max_position_embeddings=200, pad_token_id=0, type_vocab_size=1, num_labels=1)
    model = RobertaForSequenceClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    warm = a.steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
    def batch(items):
        seqs = [enc(q, c) for q, c, r, _ in items] + [enc(q, r) for q, c, r, _ in items]
        w = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (w - len(s)) for s in seqs])
        return ids, (ids != 0).long()
    started = time.time()
    for step in range(a.steps):
        items = rng.sample(train, a.batch)
        ids, mask = batch(items)
        scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(scores[: a.batch] - scores[a.batch :]).mean()
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        if (step + 1) % 500 == 0:
            print(f"step {step + 1} loss {loss.item():.3f} ({time.time() - started:.0f} s)")
    evaluate(model, test, batch)

def evaluate(model, test, batch, indent=""):
    """Prints held-out pairwise accuracy per kind of rejected answer (`batch` encodes pairs)."""
    model.eval()
    with torch.no_grad():
        for kind in ["corrupted_step", "wrong_answer", "broken_format", None]:
            items = [t for t in test if kind is None or t[3] == kind]
            ids, mask = batch(items)
            s = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            acc = (s[: len(items)] > s[len(items) :]).float().mean().item()
            print(f"{indent}{kind or 'overall'}: {100 * acc:.1f}% of {len(items)}")

if __name__ == "__main__":
    main()
