"""Verifiable domains: procedural prompts, exact checkers, held-out evaluation sets.

A domain is anything with a `name`, a `generate(rng) -> Problem` and a `check(problem, response)
-> bool` (the reward of GRPO and the metric of evaluation). The built-ins are small enough for a
`nano` model to learn in minutes on a CPU, and need no data files:

    sum    add up 3-5 single digits        "Sum 3 9 1 7"              -> "20"
    sort   sort 7-12 single digits         "Sort 3 9 1 7 0 4 4"       -> "0 1 3 4 4 7 9"
    expr   a small Python expression       "Evaluate max(3, 9, 1)"    -> "9"
           over a digit list, in think     "Evaluate [4, 1, 7][2]"    -> "<think>0:4 1:1 2:7
           mode (reasoning, then answer)                                 </think>7"

A domain answered in think mode (`Domain.thinking`, as `expr`) has worked reasoning in its
problems (`Problem.reasoning`): SFT trains it as the assistant's reasoning_content, and sampling
(GRPO, distillation, evaluation) opens the assistant turn with `<think>`; only the content after
`</think>` is checked.

Training problems and evaluation problems never overlap, whatever their counts: every problem is
assigned to one side by a hash of its prompt (`is_eval_prompt`), so `problems(n, seed)` only
yields training-side prompts and `eval_set(n)` only evaluation-side ones.

Your own domain: subclass `Domain` (or instantiate `FunctionDomain` with a generator and a
checker) in a Python file and pass it with `--domain-module my_tasks.py`; every `Domain` object
at the file's top level is registered under its name (`load_domain_module`).
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_EVAL_SIZE = 200
DEFAULT_MAX_TOKENS = 24  # per answer: expr's longest reasoning and answer take 23, + EOS
EVAL_SEED = 1_000_003  # the fixed held-out sets
EVAL_SHARE = 8  # 1 prompt in EVAL_SHARE (by hash) belongs to the evaluation side
MAX_DRAWS_PER_PROBLEM = 1000  # generator attempts before a domain is declared too small


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message
    answer: str  # the reference answer (also the SFT target text)
    reasoning: str = ""  # worked reasoning, the SFT target's reasoning_content (think mode)


def is_eval_prompt(prompt: str) -> bool:
    """Which side of the train/eval split a prompt is on (stable across runs and machines)."""
    return zlib.crc32(prompt.encode("utf-8")) % EVAL_SHARE == 0


class Domain:
    """A verifiable task. Subclasses set `name`, `description` and implement `generate`
    (and `check`, when an exact match of the stripped response is not the right test)."""

    name: str = "domain"
    description: str = ""
    thinking: bool = False  # answered in think mode (<think>reasoning</think>answer)

    def generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def check(self, problem: Problem, response: str) -> bool:
        """True when `response` (the assistant's content text) solves `problem`."""
        return response.strip() == problem.answer

    def problems(self, n: int, seed: int) -> list[Problem]:
        """`n` distinct training problems (never in any `eval_set`), reproducible from `seed`."""
        return self._draw(n, random.Random(seed), eval_side=False)

    def eval_set(self, n: int = DEFAULT_EVAL_SIZE) -> list[Problem]:
        """The fixed held-out set: the first `n` distinct evaluation-side problems."""
        return self._draw(n, random.Random(EVAL_SEED), eval_side=True)

    def _draw(self, n: int, rng: random.Random, eval_side: bool) -> list[Problem]:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n={n!r}: must be a non-negative integer")
        seen: set[str] = set()
        out: list[Problem] = []
        draws = 0
        while len(out) < n:
            draws += 1
            if draws > MAX_DRAWS_PER_PROBLEM * (n + 1):
                side = "evaluation" if eval_side else "training"
                raise ValueError(f"domain {self.name!r}: could not draw {n} distinct {side} "
                                 f"problems (found {len(out)}); its problem space is too small")
            problem = self.generate(rng)
            if problem.prompt in seen or is_eval_prompt(problem.prompt) != eval_side:
                continue
            seen.add(problem.prompt)
            out.append(problem)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionDomain(Domain):
    """A domain from plain functions: `generate(rng) -> Problem` and optionally
    `check(problem, response) -> bool` (default: exact match of the stripped response)."""

    def __init__(self, name: str, generate: Callable[[random.Random], Problem],
                 check: Callable[[Problem, str], bool] | None = None, description: str = "",
                 thinking: bool = False):
        self.name, self.description, self.thinking = name, description, thinking
        self._generate, self._check = generate, check

    def generate(self, rng: random.Random) -> Problem:
        return self._generate(rng)

    def check(self, problem: Problem, response: str) -> bool:
        if self._check is None:
            return super().check(problem, response)
        return bool(self._check(problem, response))


# ---------------------------------------------------------------------------------------------
# The built-in domains
# ---------------------------------------------------------------------------------------------

_INTEGER = re.compile(r"-?\d+")


def _as_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if _INTEGER.fullmatch(text) else None


class DigitSum(Domain):
    name = "sum"
    description = "add up 3-5 single digits"

    def __init__(self, min_items: int = 3, max_items: int = 5):
        self.min_items, self.max_items = min_items, max_items

    def generate(self, rng: random.Random) -> Problem:
        items = [rng.randint(0, 9) for _ in range(rng.randint(self.min_items, self.max_items))]
        return Problem("Sum " + " ".join(map(str, items)), str(sum(items)))

    def check(self, problem: Problem, response: str) -> bool:
        return _as_int(response) == int(problem.answer)


class Sorting(Domain):
    name = "sort"
    description = "sort 7-12 single digits in ascending order"

    def __init__(self, min_items: int = 7, max_items: int = 12, low: int = 0, high: int = 9):
        self.min_items, self.max_items = min_items, max_items
        self.low, self.high = low, high

    def generate(self, rng: random.Random) -> Problem:
        count = rng.randint(self.min_items, self.max_items)
        items = [rng.randint(self.low, self.high) for _ in range(count)]
        return Problem("Sort " + " ".join(map(str, items)),
                       " ".join(map(str, sorted(items))))

    def check(self, problem: Problem, response: str) -> bool:
        return response.split() == problem.answer.split()


class Expression(Domain):
    """Answered in think mode: a nano model indexes a list badly in one step (~36% right after
    SFT, and GRPO cannot fix what it never samples); counting along the list first makes the
    answer a copy of the last item (85% after SFT in `dsv4 posttrain`, 90% after GRPO)."""

    name = "expr"
    description = ("evaluate a small Python expression over a list of 3-7 digits: max(...), "
                   "min(...), len([...]) or [...][i]; reasoning first (think mode)")
    thinking = True

    def generate(self, rng: random.Random) -> Problem:
        items = [rng.randint(0, 9) for _ in range(rng.randint(3, 7))]
        listed = ", ".join(map(str, items))
        form = rng.choice(["max", "min", "len", "index"])
        if form == "index":
            index = rng.randrange(len(items))
            text = f"[{listed}][{index}]"
            reasoning = _counted(items[:index + 1])  # count up to the index: the answer is last
        elif form == "len":
            text, reasoning = f"len([{listed}])", _counted(items)
        else:
            text = f"{form}({listed})"
            best = max if form == "max" else min
            running = [best(items[:k + 1]) for k in range(len(items))]
            reasoning = " ".join(map(str, running))  # the running max/min
        return Problem(f"Evaluate {text}", str(_evaluate(text)), reasoning)

    def check(self, problem: Problem, response: str) -> bool:
        return _as_int(response) == int(problem.answer)


def _counted(items: list[int]) -> str:
    """"0:4 1:1 2:7": each item after its position."""
    return " ".join(f"{k}:{v}" for k, v in enumerate(items))


_EXPR = re.compile(r"(max|min|len)?[0-9, ()\[\]]+")
_SAFE_BUILTINS = {"max": max, "min": min, "len": len}


def _evaluate(text: str) -> int:
    """Python's value of one of our expressions (checked against their grammar first: we
    never hand anything else to eval)."""
    if not _EXPR.fullmatch(text):
        raise ValueError(f"not a max/min/len/index expression over digits: {text!r}")
    return int(eval(text, {"__builtins__": _SAFE_BUILTINS}, {}))  # noqa: S307 - gated above


DOMAINS: dict[str, Domain] = {d.name: d for d in (DigitSum(), Sorting(), Expression())}


def register_domain(domain: Domain) -> None:
    """Make a domain available by name (`get_domain`, `--domains`). Replaces one of the same
    name."""
    name = getattr(domain, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"domain name {name!r}: must be a non-empty word "
                         "(letters, digits, '_', '-', '.')")
    for method in ("generate", "check", "problems", "eval_set"):
        if not callable(getattr(domain, method, None)):
            raise ValueError(f"domain {name!r} has no {method}() method: subclass "
                             "dsv4.tasks.Domain")
    DOMAINS[name] = domain


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(sorted(DOMAINS))}")
    return DOMAINS[name]


def load_domain_module(path: str | Path) -> list[Domain]:
    """Import a Python file and register every `Domain` object defined at its top level.
    Returns them; ValueError when the file is missing, fails to import, or defines none."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--domain-module {path}: no such file")
    module_name = f"dsv4_user_domains_{zlib.crc32(str(path.resolve()).encode()):08x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--domain-module {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's code: report it in one line
        raise ValueError(f"--domain-module {path}: importing it failed: "
                         f"{type(err).__name__}: {err}") from None
    found = [v for v in vars(module).values() if isinstance(v, Domain)]
    if not found:
        raise ValueError(f"--domain-module {path}: defines no Domain object at top level "
                         "(e.g. MY = FunctionDomain('mine', generate, check))")
    for domain in found:
        register_domain(domain)
    return found


# ---------------------------------------------------------------------------------------------
# Chat encoding and evaluation
# ---------------------------------------------------------------------------------------------


# Think mode without a reasoning-effort instruction: V4's instructions are long prompts a small
# model has no use for; in the preview encoding this is its think-high layout.
THINK_EFFORT = "low"


def prompt_ids(tokenizer, prompt: str, thinking: bool = False, encoding: str = "v4"
               ) -> list[int]:
    """The V4 chat prompt for one user message, up to and including the assistant opener
    (`<｜Assistant｜></think>` in non-think mode, `<think>` in think mode)."""
    from dsv4.text.chat import encode_chat_ids

    return encode_chat_ids(tokenizer, [{"role": "user", "content": prompt}], thinking=thinking,
                           reasoning_effort=THINK_EFFORT if thinking else None,
                           encoding=encoding)


def response_text(tokenizer, tokens: list[int], thinking: bool = False) -> str:
    """The assistant content of generated tokens (stop token excluded), as the chat parser
    reads it: the reasoning of think mode is not part of the answer."""
    from dsv4.inference.engine import decode_known
    from dsv4.text.chat import parse_completion

    return parse_completion(decode_known(tokenizer, tokens), thinking=thinking)["content"]


def generate_responses(model, tokenizer, prompts: list[str], *,
                       max_tokens: int = DEFAULT_MAX_TOKENS,
                       batch: int = 512, thinking: bool = False) -> list[str]:
    """Greedy assistant responses (content text) to user prompts."""
    import torch

    from dsv4.inference.engine import Engine, SamplingParams

    encoded = [prompt_ids(tokenizer, p, thinking) for p in prompts]
    engine = Engine(model, max_batch=min(batch, len(encoded)),
                    capacity=max(len(e) for e in encoded) + max_tokens + 1)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    was_training = model.training
    with torch.no_grad():
        outputs = engine.generate(encoded, params)
    model.train(was_training)
    return [response_text(tokenizer, out, thinking) for out in outputs]
