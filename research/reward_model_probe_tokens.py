"""Can token-level error labels teach a tiny reward model to find the error? A PyTorch probe
(transformers' RobertaForSequenceClassification, d=64, 2 layers, batch 32, lr 1e-3, warmup +
cosine, Bradley-Terry loss; digits as single tokens). `--aux W` adds W times a per-token binary
cross-entropy from a linear head on the final hidden states, labelling the digits of the wrong
number in the rejected completion (a corrupted step's result or a wrong final answer), as
cotlab's `token_loss_weight` does. Held-out pairs come from questions never trained on.

Held-out pairwise accuracy, overall / corrupted step / wrong answer / broken format (session 5):

The generator's default task (operands 1-20, + - *, 1-3 operations; fresh problems every batch):

    --aux 0   2000 steps: 65.8 / 47.5 / 50.0 / 100     8000 steps: 70.2 / 54.0 / 56.5 / 100
    --aux 1   2000 steps: 79.5 / 54.0 / 84.5 / 100     8000 steps: 84.7 / 60.5 / 93.5 / 100

`--study-task` (configs/default.toml's: one-digit + and -, 1-2 operations; `--train-size 8000`
pairs, test questions excluded):

    --aux 0   2000 steps: 71.8 / 48.5 / 66.8 / 100
    --aux 1   2000 steps: 78.3 / 49.5 / 93.6 / 91.5

The labels teach the copy check (`#### N` against the last step's result) that the pairwise
loss alone barely learns, on some initialisations: checking a step's arithmetic stays at chance
even on the study's one-digit facts. How much depends on the initial weights: trained on
cotlab's own pairs and tokenizer (dumped from `build_comparisons` and `train_tokenizer`), with
--aux 1 for 1000 steps, wrong-answer accuracy was 80.5 / 79.7 / 53.4% at torch seeds 0 / 1 / 2,
and 57.9% from the initial weights cotlab draws (`cargo xtask reward-model --steps 0 --out`).
cotlab itself (`cargo xtask reward-model --steps 1000 --batch-size 32 --token-loss-weight 1`):
51.9-64.7% at seed 0 (two and one threads), 63.5% at seed 1, 65.7% at seed 2; without the loss
59.1% at seed 1 (and 60.2% at 2000 steps, seed 0). So: a few points in cotlab, more on lucky
initialisations, nowhere near what 90% needs.

    python research/reward_model_probe_tokens.py --study-task --train-size 8000 --steps 2000 --aux 1.0
    cargo xtask reward-model --steps 0 --dump-pairs /tmp/pairs --out /tmp/rm_init
    python research/reward_model_probe_tokens.py --pairs /tmp/pairs --aux 1 --steps 1000 --seed 1
        [--init-from /tmp/rm_init]   # cotlab's initial weights
"""
import argparse, json, math, random, time
import torch, torch.nn as nn
from transformers import RobertaConfig, RobertaForSequenceClassification

from problems import DEFAULT_TASK, KINDS, STUDY_TASK, TOKEN, draw, spoil

def make_pair(rng, kind, task=DEFAULT_TASK):
    """A comparison of `kind` on a fresh problem of `task` (`kind` may fall back to a wrong answer)."""
    return spoil(rng, draw(rng, task), kind)

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=64); p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=6000); p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--aux", type=float, default=0.0)
    p.add_argument("--train-size", type=int, default=0, help="0: fresh problems every batch")
    p.add_argument("--threads", type=int, default=1); p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--study-task", action="store_true", help="configs/default.toml's task: one-digit + and -, 1-2 operations")
    p.add_argument("--pairs", help="a directory from `cargo xtask reward-model --dump-pairs`: cotlab's pairs and tokenizer")
    p.add_argument("--init-from", help="initial weights (a RobertaForSequenceClassification directory)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(); torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
    task = STUDY_TASK if a.study_task else DEFAULT_TASK
    rng = random.Random(a.seed)
    test = [make_pair(rng, KINDS[i % 3], task) for i in range(600)]
    test_q = {t[0] for t in test}
    def fresh_pair():
        while True:
            t = make_pair(rng, KINDS[rng.randrange(3)], task)
            if t[0] not in test_q: return t
    pool = [fresh_pair() for _ in range(a.train_size)] if a.train_size else None
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in "0123456789": vocab[ch] = len(vocab)
    for w in ["What", "is", "A", "Let", "s", "break", "it", "down", "The", "answer"] + list("()?+-*=#:.'\n"): vocab.setdefault(w, len(vocab))
    def enc(q, c, bad_line=None):
        ids = [1]; lab = [0]
        full = q + "\n" + c
        comp_start = len(q) + 1
        lines_start = [comp_start]
        for i, ch in enumerate(c):
            if ch == "\n": lines_start.append(comp_start + i + 1)
        lo = hi = None
        if bad_line is not None:
            lo = lines_start[bad_line]; hi = lines_start[bad_line + 1] if bad_line + 1 < len(lines_start) else len(full)
            seg = full[lo:hi]; cut = max(seg.rfind("="), seg.rfind("#"))
            lo = lo + cut
        for m in TOKEN.finditer(full):
            ids.append(vocab.setdefault(m.group(), len(vocab)))
            lab.append(1 if lo is not None and lo <= m.start() < hi and m.group().isdigit() else 0)
        ids.append(2); lab.append(0)
        return ids, lab
    vocab_size, pad, max_positions = 64, 0, 130
    if a.pairs:
        # cotlab's own comparisons and tokenizer; `<cls>` and `<sep>` are its end-of-text token.
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(f"{a.pairs}/tokenizer.json")
        eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
        vocab_size, max_positions = tok.get_vocab_size(), 200
        load = lambda name: [(x["prompt"], x["chosen"], x["rejected"], x["corruption"], x.get("rejected_error")) for x in map(json.loads, open(f"{a.pairs}/{name}"))]
        pool, test = load("train.jsonl"), load("held_out.jsonl")
        def enc(q, c, err=None):
            e = tok.encode(q + "\n" + c, add_special_tokens=False); shift = len(q) + 1
            labels = [int(bool(err) and s < err["end"] + shift and t > err["start"] + shift) for s, t in e.offsets]
            return [eos] + e.ids + [eos], [0] + labels + [0]
    cfg = RobertaConfig(vocab_size=vocab_size, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
                        intermediate_size=4 * a.hidden, max_position_embeddings=max_positions, pad_token_id=pad, type_vocab_size=1, num_labels=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = RobertaForSequenceClassification.from_pretrained(a.init_from) if a.init_from else RobertaForSequenceClassification(cfg)
    tok_head = nn.Linear(a.hidden, 1)
    params = list(model.parameters()) + list(tok_head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
    def batch(items):
        seqs = [enc(q, c) for q, c, r, _, _ in items] + [enc(q, r, bl) for q, c, r, _, bl in items]
        w = max(len(s[0]) for s in seqs)
        ids = torch.tensor([s[0] + [pad] * (w - len(s[0])) for s in seqs])
        lab = torch.tensor([s[1] + [0] * (w - len(s[1])) for s in seqs], dtype=torch.float)
        mask = torch.tensor([[1] * len(s[0]) + [0] * (w - len(s[0])) for s in seqs])
        return ids, mask, lab
    def evaluate():
        model.eval(); res = {}
        with torch.no_grad():
            for kind in KINDS + [None]:
                items = [t for t in test if kind is None or t[3] == kind]
                ids, mask, _ = batch(items)
                s = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
                res[kind or "overall"] = 100 * (s[: len(items)] > s[len(items):]).float().mean().item()
        model.train(); return " ".join(f"{k} {v:.1f}" for k, v in res.items())
    started = time.time()
    for step in range(a.steps):
        items = rng.sample(pool, a.batch) if pool else [fresh_pair() for _ in range(a.batch)]
        ids, mask, lab = batch(items)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=a.aux > 0)
        scores = out.logits.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(scores[: a.batch] - scores[a.batch:]).mean()
        if a.aux > 0:
            h = out.hidden_states[-1]
            tl = tok_head(h).squeeze(-1)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(tl, lab, reduction="none")
            loss = loss + a.aux * (bce * mask).sum() / mask.sum()
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
        if (step + 1) % a.eval_every == 0:
            print(f"step {step + 1} loss {loss.item():.3f} ({time.time() - started:.0f} s) {evaluate()}", flush=True)
if __name__ == "__main__": main()
