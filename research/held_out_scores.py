"""What a study's reward model ranks right and wrong, pair by pair.

Reads `reports/<study>/reward_model/held_out_scores.jsonl` (one held-out pair per line, with the
trained model's scores and, unless training resumed, the starting model's) and prints, per kind
of rejected answer, the pairwise accuracy before and after training with 95% Wilson intervals.
For the model's own answers (`policy_sample`), whose pairs come a few to a question, it adds
what a pair count hides:

- a question-level bootstrap interval (pairs of one question are not independent draws);
- the accuracy with each question weighted equally, and by how many right answers the question
  had among its pairs (a question the model mostly gets wrong is where ranking is hardest);
- the accuracy when the right answer is the shorter or the longer one, and the correlation of
  the score with length, since a learned score often ranks by length rather than by checking.

Standard library only: `python research/held_out_scores.py reports/<study>/reward_model/held_out_scores.jsonl`.
Comparing two studies on the same held-out pairs: pass both files.
"""

import argparse
import json
import math
import random
from collections import defaultdict


def wilson(right, n, z=1.96):
    if n == 0:
        return float("nan"), float("nan")
    p = right / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def percent(right, n):
    low, high = wilson(right, n)
    return f"{100 * right / n:5.1f}% [{100 * low:.1f}, {100 * high:.1f}] of {n}"


def correlation(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def ranks_right(score, which):
    if which == "start":
        chosen, rejected = score["at_start"]
    else:
        chosen, rejected = score["chosen_score"], score["rejected_score"]
    return chosen > rejected


def question_bootstrap(by_question, which, draws=2000, seed=0):
    """95% interval of the pooled pair accuracy, resampling questions with replacement."""
    rng = random.Random(seed)
    questions = list(by_question.values())
    values = []
    for _ in range(draws):
        sample = [rng.choice(questions) for _ in questions]
        pairs = [pair for question in sample for pair in question]
        values.append(sum(ranks_right(pair, which) for pair in pairs) / len(pairs))
    values.sort()
    return values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def report(path):
    scores = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    has_start = all(score.get("at_start") for score in scores)
    stages = (["start"] if has_start else []) + ["trained"]
    print(f"{path}: {len(scores)} held-out pairs")
    kinds = defaultdict(list)
    for score in scores:
        kinds[score["corruption"]].append(score)
    for kind, pairs in sorted(kinds.items()):
        line = ", ".join(f"{stage} {percent(sum(ranks_right(p, stage) for p in pairs), len(pairs))}" for stage in stages)
        print(f"  {kind:15} {line}")
    own = kinds.get("policy_sample", [])
    if not own:
        return
    by_question = defaultdict(list)
    for pair in own:
        by_question[pair["prompt"]].append(pair)
    print(f"\n  the model's own answers: {len(own)} pairs from {len(by_question)} questions")
    for stage in stages:
        low, high = question_bootstrap(by_question, stage)
        right = sum(ranks_right(p, stage) for p in own)
        per_question = [sum(ranks_right(p, stage) for p in q) / len(q) for q in by_question.values()]
        print(
            f"    {stage:8} pooled {100 * right / len(own):.1f}% (question bootstrap [{100 * low:.1f}, {100 * high:.1f}]),"
            f" questions weighted equally {100 * sum(per_question) / len(per_question):.1f}%"
        )
    # Right answers among a question's pairs (distinct chosen texts): 1 means one lucky right
    # sample set against the model's usual wrong answers.
    print("    by right answers among the question's pairs:")
    groups = defaultdict(list)
    for question in by_question.values():
        groups[min(len({p["chosen"] for p in question}), 3)].extend(question)
    for right_answers, pairs in sorted(groups.items()):
        label = f"{right_answers}+" if right_answers == 3 else str(right_answers)
        line = ", ".join(f"{stage} {percent(sum(ranks_right(p, stage) for p in pairs), len(pairs))}" for stage in stages)
        print(f"      {label:3} right: {line}")
    shorter = [p for p in own if len(p["chosen"]) < len(p["rejected"])]
    longer = [p for p in own if len(p["chosen"]) > len(p["rejected"])]
    print("    by length (characters):")
    for label, pairs in [("right answer shorter", shorter), ("right answer longer", longer)]:
        if pairs:
            line = ", ".join(f"{stage} {percent(sum(ranks_right(p, stage) for p in pairs), len(pairs))}" for stage in stages)
            print(f"      {label:21} {line}")
    texts = [(p["chosen"], p["chosen_score"]) for p in own] + [(p["rejected"], p["rejected_score"]) for p in own]
    print(
        f"    trained score against length: correlation {correlation([len(t) for t, _ in texts], [s for _, s in texts]):+.3f}"
        f" over {len(texts)} scored answers"
    )


def compare(first, second):
    """Pairs both files hold, matched by their texts: how many each ranks right, and the flips."""
    def load(path):
        return {
            (s["prompt"], s["chosen"], s["rejected"]): s
            for s in (json.loads(line) for line in open(path, encoding="utf-8") if line.strip())
            if s["corruption"] == "policy_sample"
        }

    a, b = load(first), load(second)
    shared = sorted(set(a) & set(b))
    if not shared:
        print("\nno own-answer pairs in common")
        return
    both = sum(ranks_right(a[k], "trained") and ranks_right(b[k], "trained") for k in shared)
    only_a = sum(ranks_right(a[k], "trained") and not ranks_right(b[k], "trained") for k in shared)
    only_b = sum(not ranks_right(a[k], "trained") and ranks_right(b[k], "trained") for k in shared)
    print(
        f"\n{len(shared)} own-answer pairs in both: both right {both}, only the first {only_a}, only the second {only_b}"
        f" (McNemar's exact two-sided p = {mcnemar(only_a, only_b):.3f})"
    )


def mcnemar(b, c):
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="held_out_scores.jsonl of one study, or of two to compare")
    args = parser.parse_args()
    for path in args.files:
        report(path)
        print()
    if len(args.files) == 2:
        compare(*args.files)


if __name__ == "__main__":
    main()
