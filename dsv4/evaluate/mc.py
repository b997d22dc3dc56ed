"""Multiple choice (MMLU-style) from local files: few-shot prompts, scored by log-likelihood and
by generation.

Row formats (JSONL, JSON array, CSV or Parquet; detected per row):

* MMLU (`cais/mmlu`): `question`, `choices` (list of strings), `answer` (index 0..n-1, or a
  letter), optional `subject`;
* letter columns: `question` (or `input`), `A`, `B`, `C`, `D` (E, ... if present), `answer`
  (or `target`, `label`) a letter; the original headerless MMLU CSVs are read this way;
* ARC: `question` {`stem`, `choices`: [{`label`, `text`}]} with `answerKey` (the original
  JSONL), or `question` text with `choices` {`text`: [...], `label`: [...]} and `answerKey`
  (the Hugging Face layout); labels may be letters or digits.

Prompt (the MMLU layout): an optional header naming the subject, `shots` solved examples, then
the question, its choices as "A. text" lines and "Answer:". Scoring:

* `letter`: log P(" A"), log P(" B"), ... after "Answer:"; the highest is the model's choice
  (`acc`);
* `text`: log P(" " + choice text) after "Question: ...\\nAnswer:" (`acc_text`, raw sum, and
  `acc_norm`, divided by the choice's UTF-8 bytes: lm-evaluation-harness's ARC/HellaSwag
  scoring);
* `generate`: greedy generation (or, with --chat / --think, a chat reply), the first standalone
  choice label in it (`em`, exact match; `unparsed` counts replies naming no label).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from dsv4.evaluate.backends import EvalError
from dsv4.evaluate.formats import FormatError, field, read_rows, text_field

LETTERS = string.ascii_uppercase
SCORINGS = ("letter", "text", "generate")
CSV_COLUMNS = ("question", "A", "B", "C", "D", "answer")


@dataclass(frozen=True)
class MCItem:
    key: str  # "file:line"
    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    answer: int  # index into choices
    subject: str | None = None


def parse_row(row: dict, where: str) -> MCItem:
    question = field(row, ("question", "input", "query"), where, "question")
    answer = field(row, ("answer", "answerKey", "target", "label", "gold"), where, "answer")
    if isinstance(question, dict):  # original ARC: {"stem", "choices": [{"label", "text"}]}
        stem = text_field(question, ("stem",), where, "question.stem")
        pairs = field(question, ("choices",), where, "question.choices")
        if not isinstance(pairs, list) or not all(isinstance(p, dict) for p in pairs):
            raise FormatError(f"{where}: question.choices must be a list of {{label, text}}")
        labels = [str(field(p, ("label",), where, "choice label")) for p in pairs]
        choices = [text_field(p, ("text",), where, "choice text") for p in pairs]
        question = stem
    elif not isinstance(question, str):
        raise FormatError(f"{where}: question must be a string, got {type(question).__name__}")
    elif "choices" in row or "options" in row:
        raw = row.get("choices", row.get("options"))
        if isinstance(raw, dict):  # HF ARC: {"text": [...], "label": [...]}
            choices = raw.get("text")
            labels = [str(x) for x in raw.get("label") or []]
        else:
            choices, labels = raw, []
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise FormatError(f"{where}: choices must be a list of strings, got {raw!r:.80}")
        labels = labels or list(LETTERS[: len(choices)])
    else:
        present = [letter for letter in LETTERS if letter in row]
        if len(present) < 2 or present != list(LETTERS[: len(present)]):
            raise FormatError(f"{where}: no choices: expected a \"choices\" list or columns "
                              f"A, B, C, D (the row has {sorted(row)[:10]})")
        choices = [str(row[letter]) for letter in present]
        labels = present
    if len(choices) < 2 or len(labels) != len(choices):
        raise FormatError(f"{where}: need at least 2 choices with one label each, got "
                          f"{len(choices)} choices and labels {labels}")
    index = answer_index(answer, labels, where)
    subject = row.get("subject") if isinstance(row.get("subject"), str) else None
    return MCItem(where, question.strip(), tuple(c.strip() for c in choices), tuple(labels),
                  index, subject)


def answer_index(answer, labels: list[str], where: str) -> int:
    """A label ("B", "2"), or an index into the choices (0-based int)."""
    if isinstance(answer, bool):
        raise FormatError(f"{where}: answer {answer!r} is neither a label nor an index")
    if isinstance(answer, str) and answer.strip() in labels:
        return labels.index(answer.strip())
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        if 0 <= index < len(labels):
            return index
    raise FormatError(f"{where}: answer {answer!r} is not one of the labels {labels} nor an "
                      f"index 0..{len(labels) - 1}")


def load_items(path: str) -> list[MCItem]:
    items = [parse_row(row, where) for where, row in read_rows(path, CSV_COLUMNS)]
    if not items:
        raise EvalError(f"{path}: no rows")
    return items


def split_shots(items: list[MCItem], dev: list[MCItem] | None, shots: int
                ) -> tuple[list[MCItem], list[MCItem]]:
    """(few-shot examples, items to score): from the dev file when given (same subject
    preferred later, per item), else the first `shots` rows, which are then not scored."""
    if dev is not None:
        return dev, items
    if shots >= len(items):
        raise EvalError(f"--shots {shots} leaves no rows to score ({len(items)} rows); give a "
                        "--dev file or fewer shots")
    return items[:shots], items[shots:]


def examples_for(item: MCItem, pool: list[MCItem], shots: int) -> list[MCItem]:
    same = [x for x in pool if x.subject == item.subject and x.key != item.key]
    return (same if len(same) >= shots else [x for x in pool if x.key != item.key])[:shots]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def format_question(item: MCItem) -> str:
    lines = [item.question] + [f"{label}. {text}" for label, text in zip(item.labels,
                                                                          item.choices)]
    return "\n".join(lines)


def letter_prompt(item: MCItem, shots: list[MCItem]) -> str:
    header = ""
    if item.subject:
        header = ("The following are multiple choice questions (with answers) about "
                  f"{item.subject.replace('_', ' ')}.\n\n")
    solved = "".join(f"{format_question(x)}\nAnswer: {x.labels[x.answer]}\n\n" for x in shots)
    return f"{header}{solved}{format_question(item)}\nAnswer:"


def text_prompt(item: MCItem, shots: list[MCItem]) -> str:
    solved = "".join(f"Question: {x.question}\nAnswer: {x.choices[x.answer]}\n\n" for x in shots)
    return f"{solved}Question: {item.question}\nAnswer:"


CHAT_INSTRUCTION = "Answer with the letter of the correct choice."


def chat_messages(item: MCItem, shots: list[MCItem]) -> list[dict]:
    messages = []
    for x in shots:
        messages += [{"role": "user", "content": f"{format_question(x)}\n\n{CHAT_INSTRUCTION}"},
                     {"role": "assistant", "content": x.labels[x.answer]}]
    messages.append({"role": "user", "content": f"{format_question(item)}\n\n{CHAT_INSTRUCTION}"})
    return messages


def parse_choice(text: str, labels: tuple[str, ...]) -> int | None:
    """Index of the first standalone label in a reply ("B", "(B)", "B.", "Answer: B")."""
    for match in re.finditer(r"(?<![A-Za-z0-9])([A-Za-z0-9]+)(?![A-Za-z0-9])", text):
        if match.group(1) in labels:
            return labels.index(match.group(1))
    return None


# ---------------------------------------------------------------------------------------------
# Scoring one batch of items
# ---------------------------------------------------------------------------------------------


def score_items(backend, items: list[MCItem], pool: list[MCItem], shots: int,
                scorings: list[str], chat: bool, think: str, max_tokens: int) -> list[dict]:
    records = [{"key": it.key, "answer": it.labels[it.answer], "subject": it.subject}
               for it in items]
    examples = [examples_for(it, pool, shots) for it in items]
    if "letter" in scorings:
        requests = [(letter_prompt(it, ex), [f" {label}" for label in it.labels])
                    for it, ex in zip(items, examples)]
        for item, rec, scores in zip(items, records,
                                     backend.batch_continuation_logprobs(requests)):
            rec["letter_logprobs"] = [s.logprob for s in scores]
            rec["letter_correct"] = _argmax(rec["letter_logprobs"]) == item.answer
    if "text" in scorings:
        requests = [(text_prompt(it, ex), [f" {c}" for c in it.choices])
                    for it, ex in zip(items, examples)]
        for item, rec, (_, conts), scores in zip(items, records, requests,
                                                 backend.batch_continuation_logprobs(requests)):
            raw = [s.logprob for s in scores]
            norm = [s.logprob / max(1, len(c.encode())) for s, c in zip(scores, conts)]
            rec["text_logprobs"] = raw
            rec["text_correct"] = _argmax(raw) == item.answer
            rec["text_norm_correct"] = _argmax(norm) == item.answer
    if "generate" in scorings:
        if chat:
            convs = [chat_messages(it, ex) for it, ex in zip(items, examples)]
            replies = [r["content"] for r in backend.chat(convs, think, max_tokens)]
        else:
            prompts = [letter_prompt(it, ex) for it, ex in zip(items, examples)]
            replies = backend.complete(prompts, max_tokens, ["\n"])
        for item, rec, reply in zip(items, records, replies):
            choice = parse_choice(reply, item.labels)
            rec["reply"] = reply
            rec["generated_choice"] = None if choice is None else item.labels[choice]
            rec["generate_correct"] = choice == item.answer
    return records


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def summarize(records: list[dict], scorings: list[str]) -> dict:
    def rate(key: str, rows=records) -> float | None:
        return sum(bool(r[key]) for r in rows) / len(rows) if rows else None

    out: dict = {"items": len(records)}
    if "letter" in scorings:
        out["acc"] = rate("letter_correct")
    if "text" in scorings:
        out["acc_text"] = rate("text_correct")
        out["acc_norm"] = rate("text_norm_correct")
    if "generate" in scorings:
        out["em"] = rate("generate_correct")
        out["unparsed"] = sum(r["generated_choice"] is None for r in records)
    subjects = sorted({r["subject"] for r in records if r.get("subject")})
    if len(subjects) > 1:
        key = {"letter": "letter_correct", "text": "text_norm_correct",
               "generate": "generate_correct"}[scorings[0]]
        out["by_subject"] = {s: rate(key, [r for r in records if r.get("subject") == s])
                             for s in subjects}
    n_choices = [len(r.get("letter_logprobs") or r.get("text_logprobs") or []) for r in records]
    if any(n_choices):
        out["chance"] = sum(1 / n for n in n_choices if n) / len([n for n in n_choices if n])
    return out
