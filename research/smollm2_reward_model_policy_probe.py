"""What the SmolLM2 causal-LM reward model prefers among the policy's own answers.

The reward model of `configs/smollm2-reward-model.toml` (SmolLM2-135M-Instruct with a score head
and LoRA, trained on the task's synthetic comparisons and 72 pairs of the model's own answers)
ranks the synthetic kinds well and the model's own right-vs-wrong answers below chance. This
probe loads the saved reward model with transformers (`LlamaForSequenceClassification`, the
layout cotlab writes), samples the policy as the study does (chat template, temperature 0.7, 48
new tokens) on the first test questions, labels each answer with the lenient checker (the last
number against the gold answer) and reports what the scores follow.

    cargo xtask compare configs/smollm2-reward-model.toml   # at least its reward-model stage
    target/release/xtask reward-model --study configs/smollm2-reward-model.toml \
        --train-size 2000 --test-size 200 --steps 1 --dump-pairs /tmp/rm-pairs
    python research/smollm2_reward_model_policy_probe.py /tmp/rm-pairs/held_out.jsonl \
        reports/smollm2-reward-model/reward_model ~/.cache/cotlab/gguf/<the converted SmolLM2 dir>

Arguments: the dumped held-out comparisons (one per test problem, in order: the questions and,
from the chosen solution's last number, the gold answers), the reward model's directory, and the
policy's directory (the study's base: the GGUF converted to safetensors).

Run on 2026-12-01 against the reward model of commit b57fdfd's study (`--questions 32`, one CPU
thread, about 3 minutes): 256 samples, 7.0% correct; 98 within-question (right, wrong) pairs,
ordered right 55.1%; the highest-scored wrong answers are long off-topic explanations, the
lowest-scored right ones short (`A: 5`), mean length right 23.4 vs wrong 33.5 tokens. The base's
own likelihood, before any reward training, prefers the right solution in 71.6% of the 67
held-out corrupted-step pairs (the trained reward model: 58.2%) and 95.5% of the wrong-answer
pairs (trained: 100%).

Run on 2026-12-01 against the reward model of `research/smollm2-reward-model-more-samples.toml`
(563 pairs of the model's own answers from 256 train questions instead of 72 from 64;
`--questions 64`, one CPU thread, 19 minutes beside a study): 512 samples, 7.8% correct; 194
within-question pairs, ordered right 66.0%; the policy's own mean token log-prob, untrained,
orders the same pairs right in 68.0%. The score now falls with length (correlation -0.587; right
answers average 22.7 tokens, wrong ones 33.3): the highest-scored wrong answers are short bare
equations (`20 - 6 = 12.`), the lowest-scored right ones long digressions. The likelihood
figures on the synthetic kinds are the base's and do not change.
"""

import argparse
import json
import re

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

SAMPLES = 8
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text):
    numbers = NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def main(pairs_path, rm_dir, policy_dir, questions):
    torch.manual_seed(0)
    pairs = [json.loads(line) for line in open(pairs_path)][:questions]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, torch_dtype=torch.float32).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, torch_dtype=torch.float32).eval()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": f"Q: {p['prompt']}"}], tokenize=False, add_generation_prompt=True)
        for p in pairs
    ]
    golds = [last_number(p["chosen"]) for p in pairs]
    tokenizer.padding_side = "left"

    def token_log_probs(prompt, completion):
        """The policy's log-probabilities of the completion's tokens after the prompt."""
        context = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + completion, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = policy(ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        return logits[torch.arange(len(targets)), targets][context.shape[1] - 1:]

    def log_likelihood(prompt, completion):
        return token_log_probs(prompt, completion).sum().item()

    rows = []
    with torch.no_grad():
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = policy.generate(
            **batch, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=48, num_return_sequences=SAMPLES,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for index, completion in enumerate(completions):
            question = index // SAMPLES
            text = prompts[question] + completion
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            score = rm(**ids).logits[0, 0].item()
            rows.append({
                "question": question,
                "completion": completion,
                "correct": last_number(completion) == golds[question],
                "score": score,
                "marker": "####" in completion,
                "cue": completion.lstrip().startswith("A: Let's break it down."),
                "length": len(tokenizer(completion, add_special_tokens=False)["input_ids"]),
                # The policy's confidence in its own answer, per token (a score with no training).
                "mean_log_prob": token_log_probs(prompts[question], completion).mean().item(),
            })
    def within_question_order(key):
        ordered = ties = total = 0
        for question in range(len(pairs)):
            right = [r for r in rows if r["question"] == question and r["correct"]]
            wrong = [r for r in rows if r["question"] == question and not r["correct"]]
            for r in right:
                for w in wrong:
                    total += 1
                    ordered += r[key] > w[key]
                    ties += r[key] == w[key]
        return ordered, ties, total

    mean = lambda xs: sum(xs) / max(len(xs), 1)
    print(f"{len(rows)} samples, {mean([r['correct'] for r in rows]):.1%} correct")
    ordered, ties, total = within_question_order("score")
    print(f"within-question pairs: {total}, ordered right {ordered / max(total, 1):.1%} (ties {ties})")
    ordered, ties, total = within_question_order("mean_log_prob")
    print(f"the policy's mean token log-prob (untrained) orders them right in {ordered / max(total, 1):.1%} (ties {ties})")
    for name, flag in [("correct", "correct"), ("with ####", "marker"), ("opening with the synthetic cue", "cue")]:
        yes = [r["score"] for r in rows if r[flag]]
        no = [r["score"] for r in rows if not r[flag]]
        print(f"mean score {name}: {mean(yes):.3f} (n={len(yes)}) vs not: {mean(no):.3f} (n={len(no)})")
    lengths = torch.tensor([float(r["length"]) for r in rows])
    scores = torch.tensor([r["score"] for r in rows])
    print(f"correlation of score and completion length: {torch.corrcoef(torch.stack([lengths, scores]))[0, 1]:.3f}")
    print(f"mean length correct {mean([r['length'] for r in rows if r['correct']]):.1f} vs wrong {mean([r['length'] for r in rows if not r['correct']]):.1f}")
    # The trunk as a checker before any training: does SmolLM2's own likelihood prefer the right
    # solution to the spoiled one? An arithmetic check the trunk cannot do is not a feature the
    # score head can read off it.
    all_pairs = [json.loads(line) for line in open(pairs_path)]
    for kind in ["corrupted_step", "wrong_answer"]:
        chosen_better = [
            log_likelihood(prompt, pair["chosen"]) > log_likelihood(prompt, pair["rejected"])
            for pair in all_pairs if pair["corruption"] == kind
            for prompt in [tokenizer.apply_chat_template([{"role": "user", "content": f"Q: {pair['prompt']}"}], tokenize=False, add_generation_prompt=True)]
        ]
        print(f"the base's likelihood prefers the right solution in {mean(chosen_better):.1%} of {len(chosen_better)} {kind} pairs")
    print("\nhighest-scored wrong and lowest-scored right answers:")
    for r in sorted([r for r in rows if not r["correct"]], key=lambda r: -r["score"])[:4]:
        print(f"  WRONG {r['score']:.2f} (gold {golds[r['question']]}): {r['completion']!r}")
    for r in sorted([r for r in rows if r["correct"]], key=lambda r: r["score"])[:4]:
        print(f"  RIGHT {r['score']:.2f} (gold {golds[r['question']]}): {r['completion']!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", help="held_out.jsonl from `xtask reward-model --dump-pairs`")
    parser.add_argument("reward_model", help="the study's reward_model/ directory")
    parser.add_argument("policy", help="the policy's directory (safetensors, tokenizer, chat template)")
    parser.add_argument("--questions", type=int, default=32, help="test questions to sample (8 answers each)")
    args = parser.parse_args()
    main(args.pairs, args.reward_model, args.policy, args.questions)
