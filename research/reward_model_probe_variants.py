"""Variants of reward_model_probe.py (session 4): what would let a tiny RoBERTa reward model
check the arithmetic of held-out solutions? Same task, model and Bradley-Terry loss; held-out
pairs come from test questions that are not training questions, and every 2000 steps the model
is also scored on training questions with fresh corruptions (memorisation shows as the gap).

Runs (d=64, 2 layers, batch 32, lr 1e-3; held-out overall / wrong answer / corrupted step):

    --fresh --dropout 0 --steps 8000                        82.7% / 95% / 49%
    --fresh --aug-ops 3 --dropout 0 --steps 6000            77%   / 59% / 59%  at 4000 steps (up to 3 operations)
    --fresh --mlm-steps 3000 --dropout 0 --steps 3000       84-85% / 95% / 53-57% (train questions: 84%)
    --fresh --no-question --dropout 0 --steps 4000          78%   / 69% / 55%  (train questions: 71%)
    --fresh --num-tokens --dropout 0 --steps 4000           68% at 2000 steps (whole numbers as tokens)

Flags: --fresh draws new corruptions of training questions every batch; --aug-ops N trains on
problems with up to N operations (test questions excluded); --mlm-steps N pretrains the encoder
as a masked LM first (digits masked with --mlm-prob, other tokens at 0.1; --mlm-aug-ops for its
problems); --no-question drops the question from the input; --num-tokens makes whole numbers
single tokens.

    python research/reward_model_probe_variants.py --fresh --mlm-steps 3000 --dropout 0 --steps 3000 --threads 2
"""
import argparse, math, random, re, time
import torch
from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaForMaskedLM

from problems import KINDS, STUDY_TASK, TOKEN, comparisons, draw_chain, spoil
from reward_model_probe import evaluate

def problem(rng, max_ops=0):
    """A problem of the study's task as reward_model_probe.py draws it, or with `max_ops` > 2
    a chain of up to `max_ops` operations (`draw_chain`'s `longer`)."""
    return draw_chain(rng, STUDY_TASK, max_ops or 0)

def pairs(rng, n, per, max_ops=0):
    return comparisons(rng, n, per, lambda rng: problem(rng, max_ops))

def fresh(rng, n, train_q, test_q=None, max_ops=0):
    """`n` pairs of a random kind each on training questions (`train_q`), or with `test_q` on
    questions outside it."""
    out = []
    while len(out) < n:
        p = problem(rng, max_ops)
        pair = spoil(rng, p, rng.choice(KINDS))
        if (test_q is None and p.question in train_q) or (test_q is not None and p.question not in test_q): out.append(pair)
    return out

NUMTOKEN = re.compile(r"(?<![\d)])-?\d+|[A-Za-z]+|\n|[^\sA-Za-z\d]")

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--aug-ops", type=int, default=0)
    p.add_argument("--mlm-steps", type=int, default=0)
    p.add_argument("--no-question", action="store_true")
    p.add_argument("--num-tokens", action="store_true")
    p.add_argument("--mlm-aug-ops", type=int, default=0)
    p.add_argument("--mlm-prob", type=float, default=0.3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per", type=int, default=2)
    p.add_argument("--wd", type=float, default=0.01)
    a = p.parse_args()
    torch.manual_seed(0); torch.set_num_threads(a.threads)
    rng = random.Random(0)
    train, test = pairs(rng, 4000, a.per), pairs(rng, 400, 1)
    train_q = {t[0] for t in train}
    test = [t for t in test if t[0] not in train_q] or test
    test_q = {t[0] for t in test}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    def enc(q, c):
        text = c if a.no_question else q + "\n" + c
        ids = [1] + [vocab.setdefault(t, len(vocab)) for t in (NUMTOKEN if a.num_tokens else TOKEN).findall(text)] + [2]
        return ids
    for q, c, r, _, _ in train + test:
        enc(q, c); enc(q, r)
    cfg = RobertaConfig(vocab_size=len(vocab) + 200, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads, hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout,
                        intermediate_size=2 * a.hidden, max_position_embeddings=300, pad_token_id=0, type_vocab_size=1, num_labels=1)
    model = RobertaForSequenceClassification(cfg)
    if a.mlm_steps:
        mlm = RobertaForMaskedLM(cfg)
        mopt = torch.optim.AdamW(mlm.parameters(), lr=a.lr, weight_decay=a.wd)
        mask_id = len(vocab) + 1
        digits = {vocab[d] for d in "0123456789" if d in vocab}
        started = time.time()
        for step in range(a.mlm_steps):
            items = fresh(rng, a.batch, train_q, test_q, a.mlm_aug_ops) if a.mlm_aug_ops else rng.sample(train, a.batch)
            seqs = [enc(q, c) for q, c, r, _, _ in items]
            w = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (w - len(s)) for s in seqs])
            att = (ids != 0).long()
            isdig = torch.zeros_like(ids, dtype=torch.bool)
            for d in digits: isdig |= ids == d
            # mask digits with prob mlm_prob, other tokens with 0.1
            probs = torch.where(isdig, torch.full(ids.shape, a.mlm_prob), torch.full(ids.shape, 0.1)) * att
            m = torch.bernoulli(probs).bool()
            labels = torch.where(m, ids, torch.full_like(ids, -100))
            inp = torch.where(m, torch.full_like(ids, mask_id), ids)
            out = mlm(input_ids=inp, attention_mask=att, labels=labels)
            mopt.zero_grad(); out.loss.backward(); torch.nn.utils.clip_grad_norm_(mlm.parameters(), 1.0); mopt.step()
            if (step + 1) % 500 == 0:
                print(f"mlm step {step + 1} loss {out.loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
        missing = model.roberta.load_state_dict(mlm.roberta.state_dict(), strict=False)
        print("loaded encoder", missing)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
    def batch(items):
        seqs = [enc(q, c) for q, c, r, _, _ in items] + [enc(q, r) for q, c, r, _, _ in items]
        w = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (w - len(s)) for s in seqs])
        return ids, (ids != 0).long()
    started = time.time()
    for step in range(a.steps):
        items = rng.sample(train, a.batch) if not a.fresh else (fresh(rng, a.batch, train_q, test_q, a.aug_ops) if a.aug_ops else fresh(rng, a.batch, train_q))
        ids, mask = batch(items)
        scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(scores[: a.batch] - scores[a.batch :]).mean()
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        if (step + 1) % 2000 == 0:
            print("held-out:"); evaluate(model, test, batch, "  ")
            print("train questions, fresh corruptions:"); evaluate(model, fresh(random.Random(7), 300, train_q), batch, "  "); model.train()
        if (step + 1) % 500 == 0:
            print(flush=True); print(f"step {step + 1} loss {loss.item():.3f} ({time.time() - started:.0f} s)")
    evaluate(model, test, batch, "  ")

if __name__ == "__main__":
    main()
