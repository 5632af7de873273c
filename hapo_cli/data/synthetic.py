"""Built-in verifiable tasks: pure functions of (task, difficulty, split, seed, index).

Each task writes its response as short intermediate steps followed by `#<answer>`, so a response
mixes structure the model only has to copy (operands, `=`, `;`, `#`, the final answer repeated
from the last step: low entropy) with decisions that can go wrong (the digits of each result:
high entropy). The verifier is "exact" on the text after the last '#'.

    arith  "47+38-19="  ->  "47+38=85;85-19=66;#66"
    add    "457+368="   ->  "7+8=15;5+6+1=12;4+3+1=8;#825"     (column sums, carries written out)
    mul    "47*38="     ->  "47*30=1410;47*8=376;1410+376=1786;#1786"
    steps  "47+38-19="  ->  "47+38=85;85-19=66;#66"  or, direct, "#66"

`steps` has arith's prompts and two response styles; its warm-up mixes them (`direct_fraction`
of the warm-up targets are the direct answer `#<answer>`, the rest the worked steps), so the
first response token is a real decision: `#` starts a short, error-prone answer, a digit a long,
reliable one, and RL can move the response length. Its reference `target` (training, held-out)
is the worked steps, the longest style. Both styles are graded the same way: only the text after
the last `#` counts, so a worked response with a wrong intermediate step but the right final
answer is correct (an outcome reward, as the paper's verifiers; the tiny model copies a step's
result into the next step, so such responses are rare).

Determinism: example `i` of a stream is drawn from `random.Random(key)` with the string key
`"{task}|{difficulty}|{split}|{seed}|{i}"` (string seeds are hashed with SHA-512 by `random`,
independent of PYTHONHASHSEED), so it never depends on what was drawn before.

Held-out split: the prompt space is partitioned by a stable hash of the prompt text
(`is_heldout_prompt`, about 1 prompt in 10). The "heldout" split draws only from that part and
every other split ("train", "warmup", ...) only from the rest, by rejection, so held-out
prompts never occur in a training or warm-up stream. Tasks whose prompt space is tiny (e.g. mul
at difficulty 1) then have few distinct held-out prompts, repeated.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

HELDOUT_SPLIT = "heldout"
HELDOUT_SEED = 20_250_916  # reserved: the held-out sets never depend on the recipe seed
HELDOUT_BUCKETS = 10  # 1 prompt in HELDOUT_BUCKETS belongs to the held-out part of the space
_MAX_REJECTIONS = 10_000


@dataclass(frozen=True)
class SyntheticItem:
    prompt: str  # raw task prompt, e.g. "47+38-19="
    target: str  # reference response (without end-of-sequence), e.g. "47+38=85;85-19=66;#66"
    answer: str  # final answer, e.g. "66"


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    levels: dict[int, str]  # difficulty -> one-line description
    sample: Callable[[random.Random, int], SyntheticItem]  # (rng, difficulty) -> item
    # share of warm-up targets written as the direct answer "#<answer>" by default (a recipe's
    # model.warmup.direct_fraction overrides it); 0: the reference responses only
    direct_fraction: float = 0.0


# ---------------------------------------------------------------------------------------------
# arith: a chain of + and - on bounded non-negative integers, one step per operation
# ---------------------------------------------------------------------------------------------

# difficulty -> (number of operands, max value M); every operand and intermediate result is in
# [0, M], so results never need a sign and the response length is bounded.
ARITH_LEVELS: dict[int, tuple[int, int]] = {
    1: (2, 99),
    2: (3, 99),
    3: (4, 99),
    4: (3, 999),
    5: (4, 999),
}


def _arith(rng: random.Random, difficulty: int) -> SyntheticItem:
    n_operands, hi = ARITH_LEVELS[difficulty]
    value = rng.randint(0, hi)
    prompt, steps = str(value), []
    for _ in range(n_operands - 1):
        while True:  # draw b uniformly, keep only ops whose result stays in [0, hi]
            b = rng.randint(0, hi)
            ops = [op for op, ok in (("+", value + b <= hi), ("-", value - b >= 0)) if ok]
            if ops:
                break
        op = rng.choice(ops)
        result = value + b if op == "+" else value - b
        steps.append(f"{value}{op}{b}={result}")
        prompt += f"{op}{b}"
        value = result
    answer = str(value)
    return SyntheticItem(prompt + "=", ";".join(steps) + f";#{answer}", answer)


# ---------------------------------------------------------------------------------------------
# add: n-digit addition, column by column from the right with the carry written out
# ---------------------------------------------------------------------------------------------

ADD_LEVELS: dict[int, int] = {1: 2, 2: 3, 3: 4, 4: 5, 5: 6}  # difficulty -> digits per operand


def _add(rng: random.Random, difficulty: int) -> SyntheticItem:
    n = ADD_LEVELS[difficulty]
    a, b = (rng.randint(10 ** (n - 1), 10**n - 1) for _ in range(2))
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for x, y in zip(da, db, strict=True):
        s = int(x) + int(y) + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    answer = str(a + b)
    return SyntheticItem(f"{a}+{b}=", ";".join(steps) + f";#{answer}", answer)


# ---------------------------------------------------------------------------------------------
# mul: a*b as partial products over the non-zero digits of b, then their sum
# ---------------------------------------------------------------------------------------------

MUL_LEVELS: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    1: ((2, 9), (2, 9)),
    2: ((10, 99), (2, 9)),
    3: ((10, 99), (10, 99)),
    4: ((100, 999), (10, 99)),
    5: ((100, 999), (100, 999)),
}


def _mul(rng: random.Random, difficulty: int) -> SyntheticItem:
    (alo, ahi), (blo, bhi) = MUL_LEVELS[difficulty]
    a, b = rng.randint(alo, ahi), rng.randint(blo, bhi)
    digits = str(b)
    terms = [int(d) * 10 ** (len(digits) - 1 - k) for k, d in enumerate(digits) if d != "0"]
    answer = str(a * b)
    if len(terms) == 1:
        steps = [f"{a}*{b}={answer}"]
    else:
        steps = [f"{a}*{t}={a * t}" for t in terms]
        steps.append("+".join(str(a * t) for t in terms) + f"={answer}")
    return SyntheticItem(f"{a}*{b}=", ";".join(steps) + f";#{answer}", answer)


# ---------------------------------------------------------------------------------------------
# steps: arith's prompts, answered directly ("#66") or in worked steps (arith's target)
# ---------------------------------------------------------------------------------------------

# Default share of direct answers in the steps warm-up (calibrated with recipes/tiny/steps_*.yaml:
# docs/results.md, "The steps task").
STEPS_DIRECT_FRACTION = 0.4


def direct_response(answer: str) -> str:
    """The direct style of any task: the final answer alone, "#66"."""
    return f"#{answer}"


TASKS: dict[str, Task] = {
    "arith": Task(
        "arith",
        "chain of + and - on integers in [0, M], one written step per operation",
        {d: f"{k} operands in [0, {m}]" for d, (k, m) in ARITH_LEVELS.items()},
        _arith,
    ),
    "add": Task(
        "add",
        "n-digit addition, column sums from the right with carries written out",
        {d: f"{n}-digit + {n}-digit" for d, n in ADD_LEVELS.items()},
        _add,
    ),
    "mul": Task(
        "mul",
        "multiplication as partial products over the digits of the second factor",
        {d: f"[{a[0]}, {a[1]}] * [{b[0]}, {b[1]}]" for d, (a, b) in MUL_LEVELS.items()},
        _mul,
    ),
    "steps": Task(
        "steps",
        "arith prompts; the response is the direct answer or the worked steps (policy's choice)",
        {d: f"{k} operands in [0, {m}]" for d, (k, m) in ARITH_LEVELS.items()},
        _arith,
        STEPS_DIRECT_FRACTION,
    ),
}


def check_task(task: str, difficulty: int) -> Task:
    """The registered task, or a ValueError naming the known tasks / the difficulty range."""
    if task not in TASKS:
        raise ValueError(
            f"unknown synthetic task '{task}': known tasks are {', '.join(sorted(TASKS))}"
        )
    if difficulty not in TASKS[task].levels:
        raise ValueError(f"synthetic task '{task}': difficulty={difficulty} must be in 1-5")
    return TASKS[task]


def is_heldout_prompt(prompt: str) -> bool:
    """Stable partition of the prompt space: True for about 1 prompt in HELDOUT_BUCKETS."""
    return zlib.crc32(prompt.encode()) % HELDOUT_BUCKETS == 0


def synthetic_item(
    task: str, difficulty: int, split: str, seed: int, index: int, direct_fraction: float = 0.0
) -> SyntheticItem:
    """Example `index` of the (task, difficulty, split, seed) stream: a pure function. With
    `direct_fraction` > 0 its target is the direct answer with that probability (one more draw
    of the same generator after the prompt: the prompt does not depend on it)."""
    spec = check_task(task, difficulty)
    if index < 0:
        raise ValueError(f"synthetic_item: index={index} must be >= 0")
    if not 0.0 <= direct_fraction <= 1.0:
        raise ValueError(f"synthetic_item: direct_fraction={direct_fraction} must be in [0, 1]")
    rng = random.Random(f"{task}|{difficulty}|{split}|{seed}|{index}")
    want_heldout = split == HELDOUT_SPLIT
    for _ in range(_MAX_REJECTIONS):
        item = spec.sample(rng, difficulty)
        if is_heldout_prompt(item.prompt) == want_heldout:
            if direct_fraction > 0.0 and rng.random() < direct_fraction:
                return replace(item, target=direct_response(item.answer))
            return item
    raise RuntimeError(f"synthetic task '{task}': no {split} prompt after {_MAX_REJECTIONS} draws")
