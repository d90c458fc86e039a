"""Can a tiny RoBERTa reward model learn the default study's comparisons? A PyTorch probe of the
same task, model shape and loss as cotlab's tiny reward model, to tell a learnability limit from
a cotlab problem.

Comparisons as crates/reward-model/src/comparisons.rs builds them (plain template; problems.py):
chosen = a correct worked solution; rejected = a corrupted step with the error propagated, a
wrong final answer after a correct derivation, or a broken format (marker dropped, or `The answer
is N.`), on the study's task (one-digit + and -, 1-2 operations).
Model: transformers' RobertaForSequenceClassification, one output, Bradley-Terry loss, AdamW,
warmup + cosine. Prints held-out pairwise accuracy per kind of rejected answer.

    python research/reward_model_probe.py --hidden 64 --layers 2 --steps 1500
"""
import argparse, math, random, time
import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from problems import STUDY_TASK, TOKEN, comparisons, draw_chain

def pairs(rng, n, per):
    """`per` comparisons for each of `n` problems of the study's task (`draw_chain`'s order)."""
    return comparisons(rng, n, per, lambda rng: draw_chain(rng, STUDY_TASK))

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
    for q, c, r, _, _ in train + test:
        enc(q, c); enc(q, r)
    cfg = RobertaConfig(vocab_size=len(vocab) + 8, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
                        intermediate_size=2 * a.hidden, max_position_embeddings=200, pad_token_id=0, type_vocab_size=1, num_labels=1)
    model = RobertaForSequenceClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
    def batch(items):
        seqs = [enc(q, c) for q, c, r, _, _ in items] + [enc(q, r) for q, c, r, _, _ in items]
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
