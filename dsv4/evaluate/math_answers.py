"""Math with a final answer (GSM8K-style) from local files: few-shot, greedy, exact match.

Rows (JSONL, JSON array, CSV or Parquet): the problem in `question` (or `problem`, `input`), the
reference in `answer` (or `solution`, `final_answer`, `target`). The reference's final answer
is what follows the last "####" (GSM8K), else the last \\boxed{...} (MATH), else the whole
field. A prediction's final answer is, in this order, what follows the last "####", the last
\\boxed{...}, the number after the last "answer is", or the last number in the reply. Numbers
compare by value ("1,000" = "1000.00" = "$1000"); anything else compares as text with spaces,
"$" and a trailing "." removed.

Prompts: without chat, `shots` solved examples as "Question: ...\\nAnswer: <solution>" blocks
(the GSM8K solutions end in "#### N"), generation stopping at a blank line or "Question:".
With --chat or a --think mode, the examples are earlier user/assistant turns in the V4 chat
encoding and the reply's content (its reasoning excluded) is parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from dsv4.evaluate.backends import EvalError
from dsv4.evaluate.formats import read_rows, text_field
from dsv4.model.config import is_number

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
CHAT_INSTRUCTION = "Solve the problem step by step. End with a line '#### <final answer>'."
STOP = ("\n\n", "Question:")


@dataclass(frozen=True)
class MathItem:
    key: str
    question: str
    solution: str  # the reference field as written (used in few-shot examples)
    answer: str  # its final answer


def reference_answer(solution: str) -> str:
    if "####" in solution:
        return solution.rsplit("####", 1)[1].strip()
    boxed = _BOXED.findall(solution)
    return boxed[-1].strip() if boxed else solution.strip()


def predicted_answer(text: str) -> str | None:
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        number = _NUMBER.search(tail)
        return number.group(0) if number else (tail.splitlines()[0] if tail else None)
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    said = re.findall(r"answer is[:\s]*(" + _NUMBER.pattern + ")", text, flags=re.IGNORECASE)
    if said:
        return said[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Fraction | None:
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def same_answer(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    a, b = as_number(predicted), as_number(reference)
    if a is not None and b is not None:
        return a == b

    def norm(s: str) -> str:
        return s.replace(" ", "").replace("$", "").rstrip(".")

    return norm(predicted) == norm(reference)


def parse_row(row: dict, where: str) -> MathItem:
    question = text_field(row, ("question", "problem", "input"), where, "question")
    raw = None
    for name in ("answer", "solution", "final_answer", "target"):
        if row.get(name) is not None:
            raw = row[name]
            break
    if raw is None:
        text_field(row, ("answer", "solution", "final_answer", "target"), where, "answer")
    if is_number(raw):
        raw = str(raw)
    if not isinstance(raw, str) or not raw.strip():
        raise EvalError(f"{where}: answer must be a non-empty string or number, got {raw!r:.60}")
    answer = reference_answer(raw)
    if not answer:
        raise EvalError(f"{where}: answer {raw!r:.80} has nothing after '####'")
    return MathItem(where, question.strip(), raw.strip(), answer)


def load_items(path: str) -> list[MathItem]:
    items = [parse_row(row, where) for where, row in read_rows(path, ("question", "answer"))]
    if not items:
        raise EvalError(f"{path}: no rows")
    return items


def completion_prompt(item: MathItem, shots: list[MathItem]) -> str:
    solved = "".join(f"Question: {x.question}\nAnswer: {x.solution}\n\n" for x in shots)
    return f"{solved}Question: {item.question}\nAnswer:"


def chat_messages(item: MathItem, shots: list[MathItem]) -> list[dict]:
    messages = []
    for x in shots:
        messages += [{"role": "user", "content": f"{x.question}\n\n{CHAT_INSTRUCTION}"},
                     {"role": "assistant", "content": x.solution}]
    messages.append({"role": "user", "content": f"{item.question}\n\n{CHAT_INSTRUCTION}"})
    return messages


def score_items(backend, items: list[MathItem], shots: list[MathItem], chat: bool, think: str,
                max_tokens: int) -> list[dict]:
    if chat:
        replies = [r["content"] for r in backend.chat([chat_messages(it, shots) for it in items],
                                                      think, max_tokens)]
    else:
        replies = backend.complete([completion_prompt(it, shots) for it in items], max_tokens,
                                   STOP)
    records = []
    for item, reply in zip(items, replies):
        predicted = predicted_answer(reply)
        records.append({"key": item.key, "answer": item.answer, "predicted": predicted,
                        "reply": reply, "correct": same_answer(predicted, item.answer)})
    return records


def summarize(records: list[dict]) -> dict:
    n = len(records)
    return {"items": n, "em": sum(r["correct"] for r in records) / n if n else None,
            "unparsed": sum(r["predicted"] is None for r in records)}
