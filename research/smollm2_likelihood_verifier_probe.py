"""Can SmolLM2 check answers through its own likelihood, trained as a verifier?

The causal-LM reward model of `configs/smollm2-reward-model.toml` (a score head on the last
token) missed two of issue #18's targets: corrupted steps (58.2%, target 70%) and the model's
own answers (33.8%, later 62-65% with more of them; target 75%). Yet SmolLM2's likelihood,
untrained, already prefers the right solution in 71.6% of corrupted-step pairs and orders its own
right and wrong answers right in 68%. This probe trains the language model itself as the
verifier: score(x, y) = mean over y's tokens of log pi(y_t | x, y_<t) (SimPO's length-normalised
implicit reward, with no reference model), with the Bradley-Terry loss
-log sigmoid(beta (score(x, y+) - score(x, y-))) on the same synthetic comparisons the reward
model trains on. It reports held-out pairwise accuracy per kind, and on within-question pairs of
the policy's own answers (sampled as the study samples: chat template, temperature 0.7, 48 new
tokens; labelled by the last number, as the lenient checker), before and after training.

    target/release/xtask reward-model --study configs/smollm2-reward-model.toml \\
        --train-size 2000 --test-size 200 --steps 1 --dump-pairs /tmp/rm-pairs
    python research/smollm2_likelihood_verifier_probe.py /tmp/rm-pairs/train.jsonl \\
        /tmp/rm-pairs/held_out.jsonl ~/.cache/cotlab/gguf/<the converted SmolLM2 dir>

Smoke run: `--train 8 --batch 4 --questions 2 --held-out 12`.

Runs on 2026-12-01 (2 CPU threads, full fine-tuning, AdamW lr 1e-5, beta 10, batches of 8
comparisons, one pass over 400 of the 4,000 dumped train pairs of the SmolLM2 reward-model study's
task; held out: its 200 test-split pairs; own answers: 8 samples on each of the first 32 test
questions), 15-16 min each, of which training 503-540 s:

| | broken format | wrong answer | corrupted step | own answers |
|---|---|---|---|---|
| untrained (seed 0) | 10.6% of 66 | 95.5% of 67 | 68.7% of 67 | 75.5% of 98 pairs |
| trained (seed 0) | 100% | 100% | 89.6% | 82.7% of 98 |
| untrained (seed 1: other samples, other 400 train pairs) | 10.6% | 95.5% | 68.7% | 74.1% of 81 |
| trained (seed 1) | 100% | 100% | 86.6% | 72.8% of 81 |
| issue #18's targets | 95% | 85% | 70% | 75% |

Mean scores after training (seed 1): the policy's own right answers -1.063 (n = 17), its wrong
ones -1.273 (n = 239), the reference solutions -2.206, the right number repeated 8 times -2.071,
an empty `A:` -2.652, a bare `#### N` -3.176 and `#### N+1` -3.193. The score keeps the policy's
own likelihood: its own style outscores the worked reference, repetition outscores it too, and a
bare answer with no work shown is barely checked. As an RL reward it needs the rules' format
gate and the KL penalty against that; trained on pairs of the model's own answers too (as the
study's reward model is), the own-answer figure should move more than it does here.

With `--own-train-questions 64` (seed 0; 18 min): 512 answers to 64 train questions, 11 right,
give 65 own-answer pairs, trained beside the 400 synthetic ones. Held out: format 100%, wrong
answer 100%, corrupted step 83.6%, own answers 76.5% of the same 98 pairs (82.7% without them:
within the noise of 98 pairs). The gap between the policy's right and wrong answers widens (-1.032
against -1.452), and an empty `A:` (-2.169) now outscores the reference (-2.285). At a 2% hit rate
the model's own answers give too few pairs to move the figure; that takes many more questions.
"""

import argparse
import json
import random
import re
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text):
    numbers = NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def main(args):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    model = AutoModelForCausalLM.from_pretrained(args.policy, torch_dtype=torch.float32)
    train = [json.loads(line) for line in open(args.train_pairs)]
    random.shuffle(train)
    train = train[: args.train]
    held_out = [json.loads(line) for line in open(args.held_out_pairs)][: args.held_out]

    def prompt_of(question):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Q: {question}"}], tokenize=False, add_generation_prompt=True
        )

    def encode(prompt, completion):
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        return ids, len(context)

    def scores(rows):
        """Mean token log-prob of each (prompt, completion) row's completion, with gradients."""
        encoded = [encode(p, c) for p, c in rows]
        width = max(len(ids) for ids, _ in encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in encoded])
        # Position t predicts token t + 1: completion targets start at the prompt's length.
        target_mask = torch.tensor(
            [[1.0 if start - 1 <= t < len(i) - 1 else 0.0 for t in range(width - 1)] for i, start in encoded]
        )
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        log_probs = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return (log_probs * target_mask).sum(-1) / target_mask.sum(-1).clamp(min=1)

    def sample_own(questions):
        """The untrained policy's answers to `questions` (`samples` each), labelled by the last
        number, and its within-question (prompt, right, wrong) pairs."""
        if not questions:
            return [], []
        model.eval()
        tokenizer.padding_side = "left"
        prompts = [prompt_of(p["prompt"]) for p in questions]
        golds = [last_number(p["chosen"]) for p in questions]
        with torch.no_grad():
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **batch, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=48,
                num_return_sequences=args.samples,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        tokenizer.padding_side = "right"
        completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        samples = [
            (index // args.samples, prompts[index // args.samples], completion, last_number(completion) == golds[index // args.samples])
            for index, completion in enumerate(completions)
        ]
        pairs = [
            (r[1], r[2], w[2])
            for question in range(len(questions))
            for r in samples if r[0] == question and r[3]
            for w in samples if w[0] == question and not w[3]
        ]
        return samples, pairs

    # The policy's own answers, sampled once from the untrained model: on held-out questions for
    # evaluation and, with --own-train-questions, on train questions as training pairs (as the
    # study's reward model gets them).
    samples, own_pairs = sample_own(held_out[: args.questions])
    train_questions = list({p["prompt"]: p for p in train}.values())[: args.own_train_questions]
    own_train_samples, own_train_pairs = sample_own(train_questions)
    if own_train_pairs:
        print(f"{len(own_train_samples)} own samples on train questions, {sum(r[3] for r in own_train_samples)} right; "
              f"{len(own_train_pairs)} training pairs of them beside {len(train)} synthetic ones")
    train = train + [{"prompt": None, "own": pair} for pair in own_train_pairs]
    random.shuffle(train)

    def evaluate(label):
        model.eval()
        kinds = {}
        with torch.no_grad():
            for start in range(0, len(held_out), args.batch):
                chunk = held_out[start:start + args.batch]
                rows = [(prompt_of(p["prompt"]), p["chosen"]) for p in chunk] + [(prompt_of(p["prompt"]), p["rejected"]) for p in chunk]
                s = scores(rows)
                for p, chosen, rejected in zip(chunk, s[: len(chunk)], s[len(chunk):]):
                    kinds.setdefault(p["corruption"], []).append(float(chosen > rejected))
            own = []
            for start in range(0, len(own_pairs), args.batch):
                chunk = own_pairs[start:start + args.batch]
                s = scores([(p, right) for p, right, _ in chunk] + [(p, wrong) for p, _, wrong in chunk])
                own += [float(a > b) for a, b in zip(s[: len(chunk)], s[len(chunk):])]
        cells = [f"{kind} {sum(v) / len(v):.1%} of {len(v)}" for kind, v in sorted(kinds.items())]
        if own:
            cells.append(f"own answers {sum(own) / len(own):.1%} of {len(own)} pairs")
        print(f"{label}: " + ", ".join(cells), flush=True)

    print(f"{len(samples)} own samples, {sum(r[3] for r in samples)} right; {len(own_pairs)} within-question pairs")
    evaluate("untrained likelihood")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    started = time.time()
    for epoch in range(args.epochs):
        model.train()
        for start in range(0, len(train), args.batch):
            chunk = train[start:start + args.batch]
            chosen = [(p["own"][0], p["own"][1]) if "own" in p else (prompt_of(p["prompt"]), p["chosen"]) for p in chunk]
            rejected = [(p["own"][0], p["own"][2]) if "own" in p else (prompt_of(p["prompt"]), p["rejected"]) for p in chunk]
            s = scores(chosen + rejected)
            loss = -F.logsigmoid(args.beta * (s[: len(chunk)] - s[len(chunk):])).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = start // args.batch + 1
            if step % args.log_every == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
        evaluate(f"after epoch {epoch + 1} ({len(train)} pairs, {time.time() - started:.0f} s)")
    probe_degenerate(model, scores, prompt_of, held_out[: args.questions or 16], samples)


def probe_degenerate(model, scores, prompt_of, questions, samples):
    """What a policy could chase: the trained verifier's mean score of short or degenerate
    answers beside the policy's own right and wrong ones and the reference solutions."""
    model.eval()
    kinds = {
        "reference solution": lambda p, gold: p["chosen"],
        "bare right answer `#### N`": lambda p, gold: f"#### {gold}",
        "bare wrong answer `#### N+1`": lambda p, gold: f"#### {int(float(gold)) + 1}",
        "right number repeated 8x": lambda p, gold: " ".join([gold] * 8),
        "an empty `A:`": lambda p, gold: "A:",
    }
    with torch.no_grad():
        for name, make in kinds.items():
            rows = [(prompt_of(p["prompt"]), make(p, last_number(p["chosen"]))) for p in questions]
            print(f"mean score, {name}: {scores(rows).mean().item():.3f}")
        for label, right in [("the policy's right answers", True), ("the policy's wrong answers", False)]:
            rows = [(r[1], r[2]) for r in samples if r[3] == right]
            if rows:
                values = torch.cat([scores(rows[i:i + 8]) for i in range(0, len(rows), 8)])
                print(f"mean score, {label}: {values.mean().item():.3f} (n={len(rows)})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_pairs", help="train.jsonl from `xtask reward-model --dump-pairs`")
    parser.add_argument("held_out_pairs", help="held_out.jsonl from the same dump")
    parser.add_argument("policy", help="SmolLM2's directory (safetensors, tokenizer, chat template)")
    parser.add_argument("--train", type=int, default=800, help="train comparisons (shuffled)")
    parser.add_argument("--held-out", type=int, default=200, help="held-out comparisons")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="comparisons per step")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=10.0, help="scale of the score difference in the loss")
    parser.add_argument("--questions", type=int, default=32, help="held-out questions whose own answers are sampled")
    parser.add_argument("--samples", type=int, default=8, help="answers per question")
    parser.add_argument("--own-train-questions", type=int, default=0,
                        help="train questions whose own answers are sampled and added as training pairs")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
