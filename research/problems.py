"""The synthetic arithmetic task and its comparison pairs, shared by every research script.

A Python copy of what cotlab draws, so that a probe trains on the same text cotlab does:

- crates/tasks/src/synthetic.rs: `Task` is `SyntheticConfig`, `random_expression` and `draw` are
  `random_expression` and one draw of `generate`'s loop, `show` is `Expression`'s `Display`,
  `worked_steps` is `Expression::collect_steps` (and `evaluate`), `generate` is `generate`;
- crates/prompting/src/template.rs: `prompt` and `response` are `Template::Plain`'s (`CUE` is
  `PLAIN_ANSWER_CUE`);
- crates/reward-model/src/comparisons.rs: `nearby` is `nearby`, `corrupt` is `corrupt_step`,
  `spoil` is `build_comparisons`' match on the kind (with `wrong_answer` and `break_format`), and
  `comparisons` is `build_comparisons`.

Differences from the Rust: Python's `random.Random` instead of ChaCha8 (the same distributions,
other problems for a seed); a solution is kept as `(a, op, b, c)` steps rather than text lines;
`Pair.bad_line` is the index of the completion's line holding the error where cotlab records
its bytes (`Comparison::rejected_error`). `draw_chain` is an older draw order of the study's
problems, kept so that reward_model_probe.py and reward_model_probe_variants.py reproduce the
numbers they record.
"""
import re
from dataclasses import dataclass
from typing import NamedTuple, Optional


@dataclass(frozen=True)
class Task:
    """How problems are drawn: `SyntheticConfig` (its defaults, less the split sizes and seed)."""
    min_operand: int = 1
    max_operand: int = 20
    min_operations: int = 1
    max_operations: int = 3
    max_depth: int = 2
    operators: str = "+-*"


DEFAULT_TASK = Task()  # SyntheticConfig::default()
STUDY_TASK = Task(max_operand=9, max_operations=2, operators="+-")  # configs/default.toml's [task.synthetic]

PRECEDENCE = {"+": 1, "-": 1, "*": 2}  # Operator::precedence


def apply(op, left, right):
    """`Operator::apply`."""
    return left + right if op == "+" else left - right if op == "-" else left * right


# An expression is ("num", value) or ("op", op, left, right): `Expression`.

def random_expression(rng, task, operations, depth):
    """`random_expression`: exactly `operations` operations, nested at most `depth` deep."""
    if operations == 0:
        return ("num", rng.randint(task.min_operand, task.max_operand))
    side_capacity = (1 << (depth - 1)) - 1
    remaining = operations - 1
    left = rng.randint(max(0, remaining - side_capacity), min(remaining, side_capacity))
    op = rng.choice(task.operators)
    return ("op", op, random_expression(rng, task, left, depth - 1), random_expression(rng, task, remaining - left, depth - 1))


def precedence(e):
    """`Expression::precedence`."""
    return 99 if e[0] == "num" else PRECEDENCE[e[1]]


def show(e, bracket_all=False):
    """`Expression`'s `Display`: the parentheses the tree needs, and a right operand of equal
    precedence bracketed too. `bracket_all` brackets every operand that is an operation (how
    `draw_chain` writes chains of more than two operations)."""
    if e[0] == "num":
        return str(e[1])
    _, op, left, right = e
    sl, sr = show(left, bracket_all), show(right, bracket_all)
    if precedence(left) < PRECEDENCE[op] or (bracket_all and left[0] == "op"):
        sl = f"({sl})"
    if precedence(right) <= PRECEDENCE[op] or (bracket_all and right[0] == "op"):
        sr = f"({sr})"
    return f"{sl} {op} {sr}"


def worked_steps(e):
    """`Expression::collect_steps`: one `(a, op, b, c)` step per operation, innermost first and
    left to right, and the value (`Expression::evaluate`)."""
    steps = []

    def collect(e):
        if e[0] == "num":
            return e[1]
        _, op, left, right = e
        a = collect(left)
        b = collect(right)
        c = apply(op, a, b)
        steps.append((a, op, b, c))
        return c

    return steps, collect(e)


class Problem(NamedTuple):
    """`tasks::Problem`: `question` is `What is ...?`; `steps` the worked solution's steps."""
    question: str
    steps: list
    answer: int

    @property
    def solution(self):
        """The worked solution's text (`Expression::worked_solution`, joined by newlines)."""
        return solution_text(self.steps)


def solution_text(steps):
    return "\n".join(f"{a} {op} {b} = {c}" for a, op, b, c in steps)


def problem_of(e, bracket_all=False):
    """`problem_from_expression` (less the id)."""
    steps, value = worked_steps(e)
    return Problem(f"What is {show(e, bracket_all)}?", steps, value)


def draw(rng, task=DEFAULT_TASK):
    """One problem as `generate` draws it (the number of operations, then the expression)."""
    operations = rng.randint(task.min_operations, task.max_operations)
    return problem_of(random_expression(rng, task, operations, task.max_depth))


def generate(rng, task, test_size, train_size):
    """`generate`: test problems first, then train problems, all questions distinct (so no test
    question is in train). Returns (test, train)."""
    seen, test, train = set(), [], []
    max_draws = max((train_size + test_size) * 50, 10_000)
    draws = 0
    while len(test) < test_size or len(train) < train_size:
        draws += 1
        if draws > max_draws:
            raise ValueError(f"too few distinct problems: wanted {train_size + test_size}, got {len(seen)}")
        p = draw(rng, task)
        if p.question in seen:
            continue
        seen.add(p.question)
        (test if len(test) < test_size else train).append(p)
    return test, train


def draw_chain(rng, task=STUDY_TASK, longer=0):
    """A problem of `task` drawn in reward_model_probe.py's order: the operation count, the
    first operation's operands and operator, then per further operation its operand, operator
    and side (the chain so far becomes its left or right operand). For the study's task (at
    most two operations) the same distribution as `draw`, other problems for a seed.

    `longer` > `task.max_operations` (reward_model_probe_variants.py's --aug-ops): first draws
    1..`longer` operations; a count above `task.max_operations` is kept and the chain written
    with every inner operation bracketed, otherwise the count is drawn again as without."""
    operand = lambda: rng.randint(task.min_operand, task.max_operand)
    n = rng.randint(1, longer) if longer > task.max_operations else 0
    bracket_all = n > task.max_operations
    if not bracket_all:
        n = rng.randint(task.min_operations, task.max_operations)
    a, b = operand(), operand()
    e = ("op", rng.choice(task.operators), ("num", a), ("num", b))
    for _ in range(n - 1):
        c, op = operand(), rng.choice(task.operators)
        e = ("op", op, e, ("num", c)) if rng.random() < 0.5 else ("op", op, ("num", c), e)
    return problem_of(e, bracket_all)


CUE = "A: Let's break it down."  # prompting::template::PLAIN_ANSWER_CUE


def prompt(question):
    """`Template::Plain`'s prompt."""
    return f"Q: {question}"


def response(steps, answer, ending="marker"):
    """`Template::Plain`'s response (`ending="marker"`: `#### N`), or the broken formats of
    `break_format`: `"free"` ends with `The answer is N.`, `"none"` with the last step."""
    body = f"{CUE}\n{solution_text(steps)}"
    if ending == "marker":
        return f"{body}\n#### {answer}"
    if ending == "free":
        return f"{body}\nThe answer is {answer}."
    return body


def nearby(rng, value):
    """`nearby`: value + d, d in [-5, 5] without 0, scaled by |value| / 20 when that is over 1."""
    scale = max(abs(value) // 20, 1)
    while True:
        delta = rng.randint(-5, 5) * scale
        if delta:
            return value + delta


def corrupt(rng, steps):
    """`corrupt_step`: one step's result replaced by a nearby wrong value and every later step
    recomputed from the replaced values. Returns (steps, answer, index of the corrupted step)."""
    k = rng.randrange(len(steps))
    out = list(steps)
    a, op, b, c = out[k]
    out[k] = (a, op, b, nearby(rng, c))
    replacements = [(c, out[k][3])]
    replaced = lambda v: next((to for old, to in replacements if old == v), v)
    for j in range(k + 1, len(out)):
        a, op, b, c = out[j]
        a2, b2 = replaced(a), replaced(b)
        out[j] = (a2, op, b2, apply(op, a2, b2))
        replacements.append((c, out[j][3]))
    return out, out[-1][3], k


KINDS = ["corrupted_step", "wrong_answer", "broken_format"]  # Corruption, less PolicySample


class Pair(NamedTuple):
    """`Comparison`: `kind` is its `corruption`; `bad_line` the index of the line of `rejected`
    that holds the wrong number (line 0 is `CUE`), None for a broken format."""
    question: str
    chosen: str
    rejected: str
    kind: str
    bad_line: Optional[int]


def spoil(rng, problem, kind):
    """`build_comparisons`' comparison of one kind for `problem`: a corrupted step falls back to
    a wrong answer when the corruption leaves the answer as it was."""
    chosen = response(problem.steps, problem.answer)
    if kind == "corrupted_step":
        steps, answer, k = corrupt(rng, problem.steps)
        if answer != problem.answer:
            return Pair(problem.question, chosen, response(steps, answer), kind, 1 + k)
        kind = "wrong_answer"
    if kind == "wrong_answer":  # `wrong_answer`
        rejected = response(problem.steps, nearby(rng, problem.answer))
        return Pair(problem.question, chosen, rejected, kind, 1 + len(problem.steps))
    ending = "free" if rng.random() < 0.5 else "none"  # `break_format`
    return Pair(problem.question, chosen, response(problem.steps, problem.answer, ending), kind, None)


def comparisons(rng, n, per, draw_problem):
    """`build_comparisons` over `n` problems from `draw_problem(rng)`, each drawn just before
    its `per` comparisons, the kinds rotating with the problem's index."""
    pairs = []
    for i in range(n):
        problem = draw_problem(rng)
        for k in range(per):
            pairs.append(spoil(rng, problem, KINDS[(i + k) % 3]))
    return pairs


# The reward-model probes' tokens: digits and punctuation one token each, words whole (not
# cotlab's byte-level BPE; digits as single tokens as in the study's tokenizer).
TOKEN = re.compile(r"\d|[A-Za-z]+|\n|[^\sA-Za-z\d]")
