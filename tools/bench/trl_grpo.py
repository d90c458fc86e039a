"""Reference side of `cargo xtask bench --model ... --workload grpo|generate|train`: TRL's
GRPOTrainer (grpo), or transformers' `generate` (generate) and a plain PyTorch training loop
(train), on the CPU with the settings cotlab measured.

Prints ONE JSON line with the keys cotlab's side reports: grpo_step_seconds (median of the steps
after the first), gen_tokens_per_s, train_tokens_per_s, peak_rss_bytes (getrusage's ru_maxrss),
step_seconds, completion_mean_length, reward_mean, config, versions.

    /work/venv/bin/python tools/bench/trl_grpo.py \\
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data ../shared/datasets/gsm8k/test.jsonl --prompts 8 --generations 8 --new-tokens 64 --steps 3

`--dry-run` prints the configuration and the first prompt's messages without torch or a model.

The prompts are the first prompts x steps GSM8K questions of --data, in file order (step s uses
questions s*P .. (s+1)*P, as cotlab), posed with the TRL GRPO demo's system prompt; the rewards are
the demo's xmlcount_reward_func and correctness_reward_func.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

# The TRL GRPO demo's system prompt, verbatim (cotlab's prompting::XML_REASONING_SYSTEM_PROMPT).
SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""


def extract_xml_answer(text: str) -> str:
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def count_xml(text: str) -> float:
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def xmlcount_reward_func(completions, **kwargs) -> list[float]:
    return [count_xml(completion[0]["content"]) for completion in completions]


def correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
    extracted = [extract_xml_answer(completion[0]["content"]) for completion in completions]
    return [2.0 if r == a else 0.0 for r, a in zip(extracted, answer)]


def gold_answer(text: str) -> str:
    """GSM8K's `#### N`, without thousands separators (as cotlab's tasks::normalize_number)."""
    return text.split("####")[-1].strip().replace(",", "")


def gold_response(question_row) -> str:
    """The perfect completion in the demo's format (cotlab's Template::XmlReasoning.response), for
    the train workload's fixed sequences; calculator annotations removed as cotlab does."""
    import re

    solution = re.sub(r"<<[^<>]*>>", "", question_row["answer"].split("####")[0]).strip()
    return f"<reasoning>\n{solution}\n</reasoning>\n<answer>\n{gold_answer(question_row['answer'])}\n</answer>\n"


def read_questions(path: str, count: int):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == count:
                break
    if len(rows) < count:
        sys.exit(f"{path} has {len(rows)} questions; --prompts x --steps needs {count}")
    return rows


def messages(question: str):
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def median_after_warmup(values):
    measured = values[1:] if len(values) > 1 else values
    return statistics.median(measured) if measured else None


def load(args, torch, training):
    """The model and tokenizer: a `.gguf` file through transformers' GGUF loader (dequantized),
    else a directory or hub id. bf16 generation loads bf16 weights; bf16 training keeps f32
    weights and computes under autocast (`bf16=True`), as cotlab's f32 master weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if args.dtype == "bf16" and not training else torch.float32
    if args.model.endswith(".gguf"):
        from transformers import GgufConfig

        directory, name = os.path.split(os.path.abspath(args.model))
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        # Unpacked into plain dense weights at load (as cotlab converts it), not kept in GGUF blocks.
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True))
        # The dense model keeps the GGUF quantizer attached, and the Trainer refuses to fine-tune
        # a model that has one; its weights are ordinary parameters now, so it is dropped.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        assert all(p.dtype == dtype for p in model.parameters()), "the GGUF weights were not all dequantized"
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )


def run_grpo(args, rows, torch, result):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load(args, torch, training=True)
    dataset = Dataset.from_list([{"prompt": messages(row["question"]), "answer": gold_answer(row["answer"])} for row in rows])
    rows_per_step = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "cotlab-trl-bench"),
        use_cpu=True,
        bf16=args.dtype == "bf16",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        max_steps=args.steps,
        # One optimizer step = prompts x generations completions, sampled in one generation batch.
        per_device_train_batch_size=rows_per_step // args.grad_accum,
        gradient_accumulation_steps=args.grad_accum,
        generation_batch_size=rows_per_step,
        num_generations=args.generations,
        max_completion_length=args.new_tokens,
        temperature=args.temperature,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",  # cotlab's schedule is constant after a zero warmup
        weight_decay=args.weight_decay,
        loss_type=args.loss_type,
        beta=args.beta,
        shuffle_dataset=False,  # the same questions in the same order as cotlab
    )
    seconds, step_logs = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.started)

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                # The printing callback, which runs first, may have formatted the values as text.
                step_logs.append({key: float(value) for key, value in logs.items() if isinstance(value, (int, float, str)) and _is_number(value)})

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[xmlcount_reward_func, correctness_reward_func],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Timer()],
        peft_config=lora_config(args) if args.lora_rank else None,
    )
    trainer.train()
    measured = step_logs[1:] if len(step_logs) > 1 else step_logs
    mean = lambda key: statistics.mean(log[key] for log in measured) if measured and all(key in log for log in measured) else None
    result.update(
        grpo_step_seconds=median_after_warmup(seconds),
        step_seconds=seconds,
        completion_mean_length=mean("completions/mean_length"),
        reward_mean=mean("reward"),
        # TRL's own per-step timer, a cross-check of step_seconds.
        trl_step_time=[log.get("step_time") for log in step_logs],
    )


def encode_prompts(tokenizer, rows):
    texts = [tokenizer.apply_chat_template(messages(row["question"]), tokenize=False, add_generation_prompt=True) for row in rows]
    # The template wrote the special tokens it wants, as TRL encodes chat prompts.
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def left_padded(torch, sequences, pad):
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


def run_generate(args, rows, torch, result):
    model, tokenizer = load(args, torch, training=False)
    model.eval()
    prompts = encode_prompts(tokenizer, rows)
    seconds = []
    for step in range(args.steps):
        batch = [p for p in prompts[step * args.prompts:(step + 1) * args.prompts] for _ in range(args.generations)]
        ids, mask = left_padded(torch, batch, tokenizer.pad_token_id)
        torch.manual_seed(step)
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id,
            )
        seconds.append(time.perf_counter() - started)
        assert out.shape[1] == ids.shape[1] + args.new_tokens
    result.update(
        gen_tokens_per_s=args.prompts * args.generations * args.new_tokens / median_after_warmup(seconds),
        step_seconds=seconds,
    )


def run_train(args, rows, torch, result):
    model, tokenizer = load(args, torch, training=True)
    if args.lora_rank:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(args))
    model.train()
    prompts = encode_prompts(tokenizer, rows)
    # transformers Trainer's parameter groups (cotlab's AdamW): no weight decay on biases and norm weights.
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    seconds, rates = [], []
    for step in range(args.steps):
        sequences, labels = [], []
        for prompt, row in zip(prompts[step * args.prompts:(step + 1) * args.prompts], rows[step * args.prompts:(step + 1) * args.prompts]):
            response = tokenizer(gold_response(row), add_special_tokens=False)["input_ids"]
            completion = (response * (args.new_tokens // len(response) + 1))[: args.new_tokens]
            for _ in range(args.generations):
                sequences.append(prompt + completion)
                labels.append([-100] * len(prompt) + completion)
        width = max(len(s) for s in sequences)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        target = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        micro = len(sequences) // args.grad_accum
        started = time.perf_counter()
        for start in range(0, len(sequences), micro):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                loss = model(input_ids=ids[start:start + micro], attention_mask=mask[start:start + micro], labels=target[start:start + micro]).loss
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
        rates.append(sum(len(s) for s in sequences) / seconds[-1])
    result.update(train_tokens_per_s=median_after_warmup(rates), step_seconds=seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .gguf file, a Hugging Face directory or a hub id")
    parser.add_argument("--workload", choices=["grpo", "generate", "train"], default="grpo")
    parser.add_argument("--data", required=True, help="GSM8K JSONL (question, answer)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the configuration and the first prompt; no torch, no model")
    args = parser.parse_args()
    if (args.prompts * args.generations) % args.grad_accum:
        sys.exit(f"--grad-accum {args.grad_accum} must divide --prompts x --generations = {args.prompts * args.generations}")
    config = {
        "model": args.model, "workload": args.workload, "prompts_per_step": args.prompts, "num_generations": args.generations,
        "max_completion_length": args.new_tokens, "temperature": args.temperature, "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay, "loss_type": args.loss_type, "beta": args.beta, "steps": args.steps,
        "grad_accum": args.grad_accum, "threads": args.threads, "dtype": args.dtype, "lora": args.lora_rank, "data": args.data,
    }
    rows = read_questions(args.data, args.prompts * args.steps)
    if args.dry_run:
        print(json.dumps({"config": config, "first_prompt": messages(rows[0]["question"]), "first_answer": gold_answer(rows[0]["answer"])}))
        return
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"grpo_step_seconds": None, "gen_tokens_per_s": None, "train_tokens_per_s": None, "step_seconds": [],
              "completion_mean_length": None, "reward_mean": None}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if args.workload == "grpo":
        import trl

        versions["trl"] = trl.__version__
        run_grpo(args, rows, torch, result)
    elif args.workload == "generate":
        run_generate(args, rows, torch, result)
    else:
        run_train(args, rows, torch, result)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["config"] = config
    result["versions"] = versions
    print(json.dumps(result))


if __name__ == "__main__":
    main()
