"""Needle in a haystack: does the model retrieve a fact from anywhere in a long context, and
does the CSA indexer's top-k actually pick the compressed entries that hold it?

Each item is a prompt of about `length` tokens: haystack lines (the evaluation corpus's text,
or a procedural filler) with a needle line inserted at `depth` (0 = first line, 1 = right
before the question), then the question. Variants:

* `single`: "The secret key is 4821." ... "What is the secret key? The secret key is"
* `multikey`: `keys` needles "The secret key for <name> is NNNN." at random depths, the asked
  one at `depth`; the question names it.

The model's greedy continuation (or, with `chat`, its reply to the prompt as a user message)
is correct when its first number equals the key. Numbers come from a generator seeded by the
item, so reruns ask the same questions.

Indexer check (local models): while the prompt is prefilled, the cache's `on_select` hook
records, for each CSA layer, the entries the Lightning Indexer chose for the last prompt
position (the one whose logits produce the answer's first token). The needle's tokens at
positions p lie in compressed entries p // ratio; `indexer_hit` is whether the top-k holds at
least one of them, `indexer_recall` the fraction it holds. While a query sees no more entries
than top-k it attends all of them (no selection; reported as not applicable).
`indexer_chance` is what a random top-k would give: k / visible entries.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dsv4.evaluate.backends import EvalError

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.\n")
NAMES = ("amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo",
         "juniper", "kestrel", "lantern", "meadow", "nickel", "orchid", "pepper")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class NeedleItem:
    key: str
    length: int  # requested prompt tokens
    depth: float  # 0..1
    trial: int
    answer: str


def parse_lengths(text: str) -> list[int]:
    """'1K,2K,4096' -> [1024, 2048, 4096]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1024 if part.endswith("k") else 1
        try:
            value = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            raise EvalError(f"--lengths: {part!r} is not a length such as 2048 or 4K") from None
        if value < 64:
            raise EvalError(f"--lengths: {value} is too short for a haystack (at least 64)")
        out.append(value)
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    """'0,25,50,75,100' (percent) -> [0.0, 0.25, ...]."""
    out = []
    for part in text.split(","):
        try:
            value = float(part.strip().rstrip("%"))
        except ValueError:
            raise EvalError(f"--depths: {part!r} is not a percentage") from None
        if not 0 <= value <= 100:
            raise EvalError(f"--depths: {value} is outside 0..100")
        out.append(value / 100)
    return sorted(set(out))


def default_lengths(limit: int) -> list[int]:
    """1K, 2K, 4K, ... up to the context the backend holds."""
    lengths, n = [], 1024
    while n <= limit:
        lengths.append(n)
        n *= 2
    return lengths or [limit]


def make_items(lengths: list[int], depths: list[float], trials: int, variant: str
               ) -> list[NeedleItem]:
    items = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key = f"{variant}:L{length}:d{round(depth * 100)}:t{trial}"
                answer = str(random.Random(key).randint(1000, 9999))
                items.append(NeedleItem(key, length, depth, trial, answer))
    return items


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


class Haystack:
    """A pool of haystack lines with their token counts, cycled as needed."""

    def __init__(self, text: str, count_tokens):
        lines = [line + "\n" for line in text.splitlines() if line.strip()]
        if not lines:
            raise EvalError("the haystack text is empty")
        self.lines = lines
        self.sizes = [count_tokens(line) for line in lines]
        self.count_tokens = count_tokens

    def take(self, budget: int, offset: int) -> tuple[list[str], list[int]]:
        """Lines from `offset` on (cycling) holding at most `budget` tokens, and their sizes."""
        lines, sizes, used, i = [], [], 0, offset % len(self.lines)
        while used + self.sizes[i] <= budget:
            lines.append(self.lines[i])
            sizes.append(self.sizes[i])
            used += self.sizes[i]
            i = (i + 1) % len(self.lines)
        return lines, sizes


def needle_texts(item: NeedleItem, variant: str, keys: int) -> tuple[list[tuple[float, str]],
                                                                     str, str]:
    """[(depth, needle line)], the question, and the chat question."""
    if variant == "single":
        needle = f"The secret key is {item.answer}.\n"
        question = "What is the secret key? The secret key is"
        return [(item.depth, needle)], question, "What is the secret key? Answer with the number."
    rng = random.Random(item.key + ":others")
    names = rng.sample(NAMES, keys)
    asked = names[0]
    needles = [(item.depth, f"The secret key for {asked} is {item.answer}.\n")]
    for name in names[1:]:
        needles.append((rng.random(), f"The secret key for {name} is {rng.randint(1000, 9999)}.\n"))
    question = f"What is the secret key for {asked}? The secret key for {asked} is"
    chat_q = f"What is the secret key for {asked}? Answer with the number."
    return needles, question, chat_q


@dataclass
class NeedlePrompt:
    text: str  # haystack with needles (no question)
    question: str
    chat_question: str
    needle_chars: tuple[int, int]  # character span of the asked needle in `text`


def build_prompt(item: NeedleItem, haystack: Haystack, variant: str, keys: int,
                 count_tokens) -> NeedlePrompt:
    needles, question, chat_q = needle_texts(item, variant, keys)
    fixed = sum(count_tokens(n) for _, n in needles) + count_tokens("\n" + question) + 1
    budget = item.length - fixed
    if budget < 1:
        raise EvalError(f"length {item.length} leaves no room for a haystack")
    lines, sizes = haystack.take(budget, offset=item.trial * 997)
    total = sum(sizes)
    # insertion line index for each depth: first line boundary at or past depth * total tokens
    inserts: dict[int, list[int]] = {}
    for n, (depth, _) in enumerate(needles):
        seen, at = 0, len(lines)
        for i, size in enumerate(sizes):
            if seen >= depth * total:
                at = i
                break
            seen += size
        inserts.setdefault(at, []).append(n)
    parts, span = [], (0, 0)
    length = 0
    for i in range(len(lines) + 1):
        for n in inserts.get(i, []):
            if n == 0:
                span = (length, length + len(needles[n][1]))
            parts.append(needles[n][1])
            length += len(needles[n][1])
        if i < len(lines):
            parts.append(lines[i])
            length += len(lines[i])
    return NeedlePrompt("".join(parts), question, chat_q, span)


def first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return match.group(0) if match else None


# ---------------------------------------------------------------------------------------------
# Local: prefill with the indexer recorder, then greedy decode
# ---------------------------------------------------------------------------------------------


class IndexerRecorder:
    """Keeps, per CSA layer, the indexer's choice for the last query of the latest chunk:
    `chosen[layer]` = sorted entry indices, or None when every visible entry was attended."""

    def __init__(self, cache):
        self.cache = cache
        self.layers = [i for i, layer in enumerate(cache.layers) if layer.index is not None]
        self.chosen: dict[int, list[int] | None] = {}
        self.position: dict[int, int] = {}

    def __enter__(self) -> IndexerRecorder:
        for i in self.layers:
            self.cache.layers[i].on_select = self._recorder(i)
        return self

    def __exit__(self, *exc) -> None:
        for i in self.layers:
            self.cache.layers[i].on_select = None

    def _recorder(self, layer: int):
        def record(positions, chosen) -> None:
            self.position[layer] = int(positions[0, -1])
            if chosen is None:
                self.chosen[layer] = None
            else:
                row = chosen[0, -1]
                self.chosen[layer] = sorted(int(e) for e in row[row >= 0])
        return record


def prefill_recording(model, cache, ids: list[int], chunk: int):
    """Prefill `ids` into slot 0 of `cache`, recording the indexer's choice for the last
    position. Returns (logits of the last position, recorder)."""
    import torch

    from dsv4.inference.engine import forward_step

    device = next(model.parameters()).device
    cache.reset(0)
    slot = torch.tensor([0], device=device)
    prompt = torch.tensor([ids], device=device)
    with IndexerRecorder(cache) as recorder:
        for s in range(0, len(ids), chunk):
            logits, _ = forward_step(model, cache, slot, prompt[:, s: s + chunk])
    return logits[0, -1], recorder


def greedy_continue(model, cache, logits, max_tokens: int, eos: int) -> list[int]:
    import torch

    from dsv4.inference.engine import forward_step

    device = next(model.parameters()).device
    slot = torch.tensor([0], device=device)
    out = []
    for _ in range(max_tokens):
        token = int(logits.argmax())
        if token == eos:
            break
        out.append(token)
        if len(out) == max_tokens or int(cache.lengths[0]) + 1 > cache.capacity:
            break
        logits, _ = forward_step(model, cache, slot, torch.tensor([[token]], device=device))
        logits = logits[0, -1]
    return out


def indexer_report(recorder: IndexerRecorder, ratios: list[int], needle_positions: range,
                   window: int) -> dict:
    """Per CSA layer: hit / recall of the needle's entries in the recorded top-k."""
    layers = {}
    for layer in recorder.layers:
        t = recorder.position[layer]
        ratio = ratios[layer]
        visible = (t + 1) // ratio
        needle = sorted({p // ratio for p in needle_positions if p // ratio < visible})
        chosen = recorder.chosen.get(layer)
        info: dict = {"query_position": t, "visible_entries": visible, "needle_entries": needle,
                      "needle_in_window": needle_positions.stop - 1 > t - window}
        if chosen is None or not needle:
            info["selected"] = False
        else:
            hit = [e for e in needle if e in set(chosen)]
            info.update(selected=True, chosen=chosen, hit=bool(hit),
                        recall=len(hit) / len(needle), chance=min(1.0, len(chosen) / visible))
        layers[str(layer)] = info
    return layers


def needle_token_span(tokenizer, prompt_text: str, span: tuple[int, int], bos: bool
                      ) -> range:
    """Token positions of the needle (BOS counted) in the tokenized prompt."""
    start = len(tokenizer.encode(prompt_text[: span[0]])) + bos
    end = len(tokenizer.encode(prompt_text[: span[1]])) + bos
    return range(start, end)


def run_item_local(backend, item: NeedleItem, prompt: NeedlePrompt, chat: bool,
                   max_tokens: int) -> dict:
    from dsv4.inference.engine import decode_known

    tok = backend.tokenizer
    if chat:
        from dsv4.text.chat import USER, encode_chat_ids

        user = prompt.text + "\n" + prompt.chat_question
        ids = encode_chat_ids(tok, [{"role": "user", "content": user}],
                              encoding=getattr(backend, "chat_encoding", "v4"))
        # The user text is tokenized on its own (plain text) right after <｜User｜>.
        start = ids.index(tok.token_to_id(USER)) + 1
        first, last = (len(tok.encode_plain(user[:c])) for c in prompt.needle_chars)
        positions = range(start + first, start + last)
    else:
        full = prompt.text + prompt.question
        ids = backend.prompt_ids(full)
        positions = needle_token_span(tok, full, prompt.needle_chars,
                                      bos=len(ids) > len(tok.encode(full)))
    if len(ids) + max_tokens > backend.model.cfg.max_seq_len:
        raise EvalError(f"needle prompt {item.key}: {len(ids)} tokens + --max-tokens "
                        f"{max_tokens} exceed the model's max_seq_len "
                        f"{backend.model.cfg.max_seq_len}")
    cache = backend.scratch_cache(len(ids) + max_tokens)
    logits, recorder = prefill_recording(backend.model, cache, ids, backend.prefill_chunk)
    out = greedy_continue(backend.model, cache, logits, max_tokens, backend.model.cfg.eos_token_id)
    text = decode_known(tok, out)
    if chat:
        from dsv4.text.chat import parse_completion

        text = parse_completion(text, thinking=False)["content"]
    cfg = backend.model.cfg
    return {"prompt_tokens": len(ids), "output": text, "correct": first_number(text) == item.answer,
            "needle_tokens": [positions.start, positions.stop],
            "indexer": indexer_report(recorder, cfg.compress_ratios, positions, cfg.window_size)}


def run_items_endpoint(backend, items: list[NeedleItem], prompts: list[NeedlePrompt],
                       chat: bool, max_tokens: int) -> list[dict]:
    if chat:
        convs = [[{"role": "user", "content": p.text + "\n" + p.chat_question}] for p in prompts]
        texts = [r["content"] for r in backend.chat(convs, "none", max_tokens)]
    else:
        texts = backend.complete([p.text + p.question for p in prompts], max_tokens, ["\n"])
    return [{"prompt_tokens": backend.count_tokens(p.text + p.question), "output": t,
             "correct": first_number(t) == item.answer, "indexer": {}}
            for item, p, t in zip(items, prompts, texts)]


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def summarize(records: list[dict], items: list[NeedleItem]) -> dict:
    lengths = sorted({it.length for it in items})
    depths = sorted({it.depth for it in items})
    grid = [[[] for _ in lengths] for _ in depths]
    recall_grid = [[[] for _ in lengths] for _ in depths]
    per_layer: dict[str, dict[str, list[float]]] = {}
    for item, rec in zip(items, records):
        d, l = depths.index(item.depth), lengths.index(item.length)
        grid[d][l].append(float(rec["correct"]))
        for layer, info in rec.get("indexer", {}).items():
            if not info.get("selected"):
                continue
            acc = per_layer.setdefault(layer, {"hit": [], "recall": [], "chance": [],
                                               "outside_window_hit": []})
            acc["hit"].append(float(info["hit"]))
            acc["recall"].append(info["recall"])
            acc["chance"].append(info["chance"])
            if not info["needle_in_window"]:
                acc["outside_window_hit"].append(float(info["hit"]))
            recall_grid[d][l].append(info["recall"])

    def mean(values):
        return sum(values) / len(values) if values else None

    summary = {
        "accuracy": mean([float(r["correct"]) for r in records]),
        "lengths": lengths,
        "depths": depths,
        "accuracy_grid": [[mean(c) for c in row] for row in grid],
        "accuracy_by_length": {str(n): mean([float(r["correct"]) for it, r in zip(items, records)
                                             if it.length == n]) for n in lengths},
    }
    if per_layer:
        summary["indexer"] = {
            "layers": {layer: {k: mean(v) for k, v in acc.items()} | {"queries": len(acc["hit"])}
                       for layer, acc in sorted(per_layer.items(), key=lambda kv: int(kv[0]))},
            "hit_rate": mean([h for acc in per_layer.values() for h in acc["hit"]]),
            "recall": mean([r for acc in per_layer.values() for r in acc["recall"]]),
            "chance": mean([c for acc in per_layer.values() for c in acc["chance"]]),
            "recall_grid": [[mean(c) for c in row] for row in recall_grid],
        }
    return summary
