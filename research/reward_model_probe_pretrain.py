"""Does pretraining the tiny reward model to flag wrong results (reward_model_probe_dense.py's
objective, on questions outside the held-out pairs) let the pairwise loss check a step's
arithmetic? A PyTorch probe (session 6): --pre steps of dense per-result labels, then --bt steps
of Bradley-Terry on fresh pairs plus --aux times the token loss on the rejected completion's wrong
number (as cotlab's `token_loss_weight`), held-out pairs on test-only questions (600, as
reward_model_probe_tokens.py builds them). d=64, 2 layers, 4 heads, batch 32, lr 1e-3, warmup +
cosine per phase, no dropout, one thread. --completion-first encodes `<s> completion </s></s>
question </s>`, so the solution's lines start at fixed positions.

Held-out pairwise accuracy, overall / corrupted step / wrong answer / broken format:

    --pre 0 --bt 3000 (--inter 512)      1000: 76.6 / 55.6 / 74.3 / 100    3000: 72.1 / 49.0 / 79.7 / 87.5
    --pre 2000 --bt 1000 --pc 0.3        after pretraining 57.4 / 53.0 / 46.5 / 72.5;  1000: 71.8 / 51.5 / 75.7 / 88.0
    --pre 8000 --bt 1500 --pc 0.5 --inter 1024 (13 min of pretraining; it still saw held-out questions)
                                         after pretraining 61.5 / 56.1 / 68.3 / 60.0;  1000: 76.5 / 44.4 / 85.6 / 99.5
    --completion-first --pre 0 --bt 3000 2000: 78.4 / 51.0 / 85.1 / 99.0   3000: 75.4 / 52.0 / 84.7 / 89.5

Corrupted steps stay at chance in every variant; wrong answers reach 80-86%. 90% overall would
need about 75% on corrupted steps with the other two kinds near their best.

    python research/reward_model_probe_pretrain.py --pre 2000 --bt 1000 --pc 0.3
"""
import argparse, random, time
import torch, torch.nn as nn
from transformers import RobertaConfig, RobertaForSequenceClassification

from problems import KINDS, STUDY_TASK, TOKEN
import reward_model_probe_dense as V
from reward_model_probe_tokens import make_pair

p = argparse.ArgumentParser()
p.add_argument("--hidden", type=int, default=64); p.add_argument("--layers", type=int, default=2)
p.add_argument("--inter", type=int, default=512); p.add_argument("--heads", type=int, default=4)
p.add_argument("--pre", type=int, default=2000); p.add_argument("--bt", type=int, default=1000)
p.add_argument("--batch", type=int, default=32); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--pc", type=float, default=0.3); p.add_argument("--aux", type=float, default=1.0)
p.add_argument("--completion-first", action="store_true"); p.add_argument("--seed", type=int, default=0); p.add_argument("--threads", type=int, default=1)
p.add_argument("--eval-every", type=int, default=500, help="Bradley-Terry steps between held-out evaluations")
a = p.parse_args(); torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
rng = random.Random(a.seed)
test = [make_pair(rng, KINDS[i % 3], STUDY_TASK) for i in range(600)]
testq = {t[0] for t in test}
vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
def tok(t): return [vocab.setdefault(x, len(vocab)) for x in TOKEN.findall(t)]
cfg = RobertaConfig(vocab_size=64, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
    intermediate_size=a.inter, max_position_embeddings=200, pad_token_id=0, type_vocab_size=1, num_labels=1,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
model = RobertaForSequenceClassification(cfg); head = nn.Linear(a.hidden, 1)
params = list(model.parameters()) + list(head.parameters())
def sched_opt(steps):
    opt = torch.optim.AdamW(params, lr=a.lr)
    return opt, V.schedule(opt, steps)
def pad(seqs, fill):
    w = max(map(len, seqs)); return torch.tensor([s + [fill] * (w - len(s)) for s in seqs])
def hidden_of(ids):
    out = model.roberta(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    return out
def score(h): return model.classifier(h).squeeze(-1)
t0 = time.time()
if a.pre:
    opt, sch = sched_opt(a.pre)
    for step in range(a.pre):
        ex = []
        while len(ex) < a.batch:  # questions of the held-out pairs never appear in pretraining
            pieces = V.example(rng, a.pc)
            if pieces[0][0].split("\n")[0] not in testq: ex.append(pieces)
        encoded = [V.encode(pieces, vocab) for pieces in ex]
        ids = pad([i for i, _ in encoded], 0); labs = pad([l for _, l in encoded], -100)
        lg = head(hidden_of(ids)).squeeze(-1); m = labs >= 2; tgt = ((labs == 2) | (labs == 4)).float()
        loss = nn.functional.binary_cross_entropy_with_logits(lg[m], tgt[m])
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sch.step()
        if (step + 1) % 1000 == 0: print(f"pre {step+1} loss {loss.item():.3f} ({time.time()-t0:.0f}s)", flush=True)
def enc_pair(q, c, bad_line):
    if a.completion_first:  # <s> completion </s></s> question </s>: the solution's lines start at fixed positions
        ids, lab = enc_lines(c, bad_line, [1])
        tail = [2, 2] + tok(q) + [2]
        return ids + tail, lab + [0] * len(tail)
    ids, lab = enc_lines(c, bad_line, [1] + tok(q + "\n"))
    return ids + [2], lab + [0]
def enc_lines(c, bad_line, ids):
    """`ids` followed by completion `c`'s tokens; labels 1 on the digits of line `bad_line`'s last number."""
    ids = list(ids); lab = [0] * len(ids)
    lines = c.split("\n")
    for k, line in enumerate(lines):
        t = TOKEN.findall(line + ("\n" if k + 1 < len(lines) else ""))
        l = [0] * len(t)
        if k == bad_line:
            j = len(t) - 1
            while j >= 0 and not t[j].isdigit(): j -= 1
            while j >= 0 and t[j].isdigit(): l[j] = 1; j -= 1
        ids += [vocab.setdefault(x, len(vocab)) for x in t]; lab += l
    return ids, lab
def evaluate():
    model.eval()
    with torch.no_grad():
        res = {}
        for kind in KINDS:
            items = [t for t in test if t[3] == kind]
            c = pad([enc_pair(q, ch, None)[0] for q, ch, r, k, b in items], 0)
            r = pad([enc_pair(q, r, b)[0] for q, ch, r, k, b in items], 0)
            res[kind] = (score(hidden_of(c)) > score(hidden_of(r))).float().mean().item()
    model.train()
    return f"overall {100*sum(res.values())/3:.1f} " + " ".join(f"{k} {100*v:.1f}" for k, v in res.items())
print("after pretraining:", evaluate(), flush=True)
opt, sch = sched_opt(a.bt)
for step in range(a.bt):
    items = []
    while len(items) < a.batch:
        t = make_pair(rng, KINDS[len(items) % 3], STUDY_TASK)
        if t[0] not in testq: items.append(t)
    enc = [enc_pair(q, c, None) for q, c, r, k, b in items] + [enc_pair(q, r, b) for q, c, r, k, b in items]
    ids = pad([e[0] for e in enc], 0); labs = pad([e[1] for e in enc], 0)
    h = hidden_of(ids); s = score(h)
    loss = -nn.functional.logsigmoid(s[: a.batch] - s[a.batch:]).mean()
    if a.aux:
        lg = head(h).squeeze(-1); m = ids != 0
        loss = loss + a.aux * nn.functional.binary_cross_entropy_with_logits(lg[m], labs[m].float())
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sch.step()
    if (step + 1) % a.eval_every == 0: print(f"bt {step+1} loss {loss.item():.3f} {evaluate()} ({time.time()-t0:.0f}s)", flush=True)
