"""From engine events to what an OpenAI client sees, one choice at a time.

`TextChoice` turns a generation's tokens into text: incremental detokenization (never splitting
a UTF-8 character), cut before the first stop string, with any tail that could still grow into
a stop string held back, so a stop string never reaches the client, not even in part.
`ChatChoice` feeds that text through `dsv4.text.chat.StreamParser`, which splits it into
`reasoning_content`, `content` and DSML tool calls without letting markup leak (a tool call is
sent once complete, arguments whole). Streaming and non-streaming responses are built from the
same deltas, so both say exactly the same thing.

Malformed tool calls: what the parser repairs (a missing closing tag, an ASCII "|", spaced
tags, calls opened inside the reasoning) arrives as ordinary tool calls. A call it cannot turn
into one (no tool name, unknown tags, loose text in the block) is never dropped silently: its
raw text is sent as `content`, so the client and the user see what the model wrote, and the
choice carries `"problems"`: the parser's list of what was malformed. A call cut off by
max_tokens is not returned (it is half written): finish_reason "length" and `problems` say so.
finish_reason keeps its OpenAI values ("tool_calls" only when calls were returned): typed
clients reject values they do not know, which would turn one bad call into a failed request.
"""

from __future__ import annotations

from dsv4.inference.engine import Event, TextStream, decode_known
from dsv4.text.chat import StreamParser


class KnownTokens:
    """A tokenizer whose `decode` shows ids outside its vocabulary as `[id]` (a random model's
    vocabulary can be larger than the fallback byte tokenizer's) instead of failing: what the
    engine's stop-string check and the logprob token strings use."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size

    def decode(self, ids) -> str:
        return decode_known(self.tokenizer, list(ids))


MAX_UNDECIDED_TOKENS = 8


def token_offsets(tokenizer, ids: list[int]) -> list[int]:
    """Where each token's text starts in the decoded text, as a `TextStream` fed these ids
    would show them (a token completing a multi-byte character after bytes held back starts
    where the held bytes start), in linear time: only the undecided tail is decoded again."""
    offsets, final_length, undecided_from = [], 0, 0
    for k in range(len(ids)):
        offsets.append(final_length)
        piece = decode_known(tokenizer, ids[undecided_from: k + 1])
        # A character has at most 4 bytes: a longer undecided tail never becomes one (random
        # bytes), and waiting longer would make this quadratic again.
        if not piece.endswith("\ufffd") or k + 1 - undecided_from >= MAX_UNDECIDED_TOKENS:
            final_length += len(piece)
            undecided_from = k + 1
    return offsets


class TextChoice:
    """One generation's visible text (see the module docstring)."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.stream = TextStream(tokenizer)
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.text = ""  # decoded so far, cut at a stop string once one appeared
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string appeared: later tokens are not shown
        self.tokens: list[int] = []
        self.offsets: list[int] = []  # per token: where its text starts in the decoded text
        self.logprobs: list[tuple[float | None, list[tuple[int, float]]]] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, event: Event) -> str:
        """The text this event makes final."""
        out = ""
        if event.token is not None and not self.stopped:
            self.tokens.append(event.token)
            self.offsets.append(len(self.stream.text))
            if event.token_logprob is not None:
                self.logprobs.append((event.token_logprob, event.top_logprobs or []))
            out = self._take(self.stream.add(event.token), final=False)
        if event.finished:
            out += self._take(self.stream.flush(), final=True)
            self.finish_reason = "stop" if self.stopped else event.finish_reason
        return out

    def _take(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        self.text += piece
        start = max(0, self.sent - self.longest_stop)
        hits = [at for s in self.stop if (at := self.text.find(s, start)) != -1]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._undecided_tail()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _undecided_tail(self) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        for size in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0


class ChatChoice:
    """A chat generation: `TextChoice` text parsed into OpenAI message deltas."""

    def __init__(self, tokenizer, stop: list[str], thinking: bool, call_id_prefix: str) -> None:
        self.text = TextChoice(tokenizer, stop)
        self.thinking = thinking
        self.parser = StreamParser(thinking=thinking, call_id_prefix=call_id_prefix)
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[dict] = []

    @property
    def finished(self) -> bool:
        return self.text.finished

    @property
    def finish_reason(self) -> str | None:
        reason = self.text.finish_reason
        if reason == "stop" and self.tool_calls:
            return "tool_calls"
        return reason

    def add(self, event: Event) -> list[dict]:
        """OpenAI chat deltas ({"reasoning_content"}, {"content"}, {"tool_calls": [...]})."""
        piece = self.text.add(event)
        parsed = self.parser.feed(piece) if piece else []
        if event.finished:
            cut_off = self.text.finish_reason == "length"
            ending = self.parser.finish(cut_off=cut_off)
            # A call cut by max_tokens is half written: finish_reason "length" and `problems`
            # say so; its markup is not shown as content.
            parsed += [item for item in ending if not (cut_off and "unparsed" in item)]
        return [self._delta(item) for item in parsed]

    @property
    def problems(self) -> list[str]:
        """What the parser found malformed in this choice's text (empty if nothing)."""
        return self.parser.problems

    def _delta(self, item: dict) -> dict:
        if "reasoning_content" in item:
            self.reasoning.append(item["reasoning_content"])
            return item
        if "content" in item or "unparsed" in item:  # an unparseable call: shown as written
            text = item.get("content", item.get("unparsed"))
            self.content.append(text)
            return {"content": text}
        call = item["tool_call"]
        self.tool_calls.append(call)
        return {"tool_calls": [{"index": len(self.tool_calls) - 1, **call}]}

    def message(self) -> dict:
        """The whole assistant message (non-streaming responses)."""
        content = "".join(self.content)
        message = {"role": "assistant",
                   "content": content if content or not self.tool_calls else None}
        if self.thinking:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message
