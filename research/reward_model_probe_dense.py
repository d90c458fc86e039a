"""Can the study's tiny RoBERTa learn to check a step's arithmetic when every result is labelled?
A PyTorch probe (session 6) of what the corrupted-step pairs need: RobertaForTokenClassification,
one logit per token, binary cross-entropy; every `a op b = c` result and the final `#### N` is
independently replaced by a nearby wrong value with probability --pc (no propagation) and its
digits labelled wrong; --results-only trains on those tokens alone. Study task (one-digit + and -,
1-2 operations), fresh problems every batch, d=64, 2 layers, 4 heads, batch 32, lr 1e-3, warmup +
cosine, no dropout (cotlab has none), one thread. Printed: share of wrong step results flagged /
right step results left clean (logit > 0), the same for the final answer.

Measured (wrong flagged / right clean):

    whole solutions, every token labelled, dropout 0.1, 3000 steps:        14.5% of wrong results flagged
    whole solutions --results-only, 2500 steps:          step 14.3 / 99.6   final 49.2 / 99.2
      d=128, 4 layers, --inter 512, dropout 0.1, 1000 steps (4x slower): step 20.7 / 84.0   final 31.7 / 92.9
      --inter 1024 --pc 0.5, 12000 steps (19 min):       step 74.1 / 62.3   final 91.1 / 96.2
        (step accuracy swings between 50/83 and 74/62 from one evaluation to the next after 6000)
      --completion-first (the question after the solution), --pc 0.5, stopped early:
        --inter 512, 3500 steps:  step 64.0 / 86.2   final 71.5 / 94.8
        --inter 1024, 2000 steps: step 15.7 / 93.6   (question first at 2000 steps: 73.6 / 35.4)
    one step line at a fixed position (--facts 0), 2000 steps:  --inter 128 24.9 / 100
      --inter 1024 70.4 / 99.2;  d=128 --inter 512 37.3 / 99.2
    the same line after 0-20 filler words (--facts 20 --inter 1024), 2500 steps: 0.0 / 100
      with sinusoidal position embeddings at init (amplitude 0.03), 3000 steps:   0.0 / 100

So the tiny encoder can memorise the one-digit facts where the operands sit at fixed positions
(a wide MLP helps: it is a lookup table), and barely learns them where the line can start
anywhere: with learned absolute positions, attending from a result to its own line's operands
has to be learned separately at every offset. The copy check (`#### N` against the last result)
is learned (91-94%). This is what keeps the reward model's corrupted-step pairs near chance.

    python research/reward_model_probe_dense.py --results-only --inter 1024 --pc 0.5 --steps 12000
    python research/reward_model_probe_dense.py --results-only --facts 20 --inter 1024
    python research/reward_model_probe_dense.py --results-only --inter 512 --pc 0.5 --steps 3500 --completion-first
"""
import argparse, math, random, time
import torch, torch.nn as nn
from transformers import RobertaConfig, RobertaForTokenClassification

from problems import CUE, STUDY_TASK, TOKEN, draw, nearby

COMPLETION_FIRST = False  # the question after the solution: the solution's lines start at fixed positions
FACTS = None  # None: whole solutions; an int: one `a op b = c` line after 0..FACTS filler words
def example(rng, pc):
    q, st, ans = draw(rng, STUDY_TASK)
    if FACTS is not None:
        x, o, y, z = st[0]
        bad = rng.random() < pc
        zz = nearby(rng, z) if bad else z
        pre = " ".join(rng.choice(["What", "is", "A", ":", "Let", "break", "it", "down", "."]) for _ in range(rng.randint(0, FACTS)))
        return [(pre + " \n", 0), (f"{x} {o} {y} = ", 0), (f"{zz}", 2 if bad else 3), ("\n#### ", 0), ("0", 5)]
    out = []
    for (x, o, y, z) in st:
        bad = rng.random() < pc
        zz = nearby(rng, z) if bad else z
        out.append((f"{x} {o} {y} = ", f"{zz}", bad))
    fin = out[-1][1]
    wa = rng.random() < pc
    fa = str(nearby(rng, int(fin))) if wa else fin
    pieces = [] if COMPLETION_FIRST else [(q + "\n", 0)]
    pieces.append((CUE + "\n", 0))
    for i, (pre, res, bad) in enumerate(out):
        pieces.append((pre, 0)); pieces.append((res, 2 if bad else 3)); pieces.append(("\n", 0))
    pieces.append(("#### ", 0)); pieces.append((fa, 4 if wa else 5))
    if COMPLETION_FIRST:
        pieces.append(("\n" + q, 0))
    return pieces
def encode(pieces, vocab):
    """`<s> text </s>` ids (new tokens added to `vocab`) and each token's label (-100 on the ends)."""
    ids, lab = [1], [-100]
    for t, l in pieces:
        for tok in TOKEN.findall(t):
            ids.append(vocab.setdefault(tok, len(vocab))); lab.append(l)
    ids.append(2); lab.append(-100)
    return ids, lab
def schedule(opt, steps):
    """Linear warmup over a twentieth of `steps`, then cosine down to a tenth."""
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=64); p.add_argument("--layers", type=int, default=2)
    p.add_argument("--inter", type=int, default=128); p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000); p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--pc", type=float, default=0.3)
    p.add_argument("--dropout", type=float, default=0.0); p.add_argument("--results-only", action="store_true"); p.add_argument("--seed", type=int, default=0); p.add_argument("--threads", type=int, default=1)
    p.add_argument("--facts", type=int, default=None, metavar="MAX_FILLER", help="one step line after 0..MAX_FILLER filler words"); p.add_argument("--sin-pos", type=float, default=0.0)
    p.add_argument("--completion-first", action="store_true"); p.add_argument("--eval-every", type=int, default=500)
    a = p.parse_args(); global FACTS, COMPLETION_FIRST; FACTS = a.facts; COMPLETION_FIRST = a.completion_first; torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    enc = lambda pieces: encode(pieces, vocab)
    for _ in range(2000): enc(example(rng, 0.5))
    cfg = RobertaConfig(vocab_size=64, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                        intermediate_size=a.inter, max_position_embeddings=200, pad_token_id=0, type_vocab_size=1, num_labels=1, hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout)
    model = RobertaForTokenClassification(cfg)
    if a.sin_pos:
        W = model.roberta.embeddings.position_embeddings.weight
        n, d = W.shape
        pos = torch.arange(n).float()[:, None]; i = torch.arange(0, d, 2).float()[None]
        ang = pos / (10000 ** (i / d))
        pe = torch.zeros(n, d); pe[:, 0::2] = torch.sin(ang); pe[:, 1::2] = torch.cos(ang)
        with torch.no_grad(): W.copy_(pe * a.sin_pos)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    sched = schedule(opt, a.steps)
    def batch(n, pc):
        ex = [enc(example(rng, pc)) for _ in range(n)]
        w = max(len(i) for i, _ in ex)
        ids = torch.tensor([i + [0] * (w - len(i)) for i, _ in ex]); lab = torch.tensor([l + [-100] * (w - len(l)) for _, l in ex])
        return ids, lab
    t0 = time.time()
    for step in range(a.steps):
        ids, lab = batch(a.batch, a.pc)
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
        m = (lab >= 2) if a.results_only else (lab != -100)
        tgt = ((lab == 2) | (lab == 4)).float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits[m], tgt[m])
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        if (step + 1) % a.eval_every == 0:
            model.eval()
            with torch.no_grad():
                ids, lab = batch(1000, 0.5)
                lg = model(input_ids=ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
                f = lambda k, pos: ((lg[lab == k] > 0) == pos).float().mean().item()
                print(f"step {step+1} loss {loss.item():.3f} step: wrong flagged {f(2,True):.3f} right clean {f(3,False):.3f} final: wrong {f(4,True):.3f} right {f(5,False):.3f} other clean {f(0,False):.3f} ({time.time()-t0:.0f}s)", flush=True)
            model.train()
if __name__ == "__main__": main()
