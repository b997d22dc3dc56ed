"""The scheduler: one background thread owns the Engine and runs `engine.step()`.

All torch work happens on that thread, off the HTTP event loop. The event loop talks to it
only through a command inbox (add / cancel / score) and gets results back on per-request
asyncio queues (`loop.call_soon_threadsafe`), so the Engine is never touched by two threads.
Between steps the thread takes new commands, which is how new requests join the running
decode batch (continuous batching).

Admission control: at most `max_batch` generations run (one per cache slot) and at most
`max_queue` more wait; a request that would exceed that is refused at once with a 429, before
anything is queued.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

from dsv4.inference.engine import Engine, SamplingParams, sample_params
from dsv4.server.protocol import APIError
from dsv4.server.scoring import PromptScorer

log = logging.getLogger("dsv4.server")


@dataclass
class Handle:
    """One HTTP request's generations as the event loop sees them: items arrive on `queue` as
    (choice index, Event), ("score", index, result) or ("error", None, APIError)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = 0
    cancelled: bool = False
    checked_at: float = field(default_factory=time.monotonic)  # last client-disconnect check

    def deliver(self, item: tuple) -> None:
        """Called from the scheduler thread."""
        deliver_all([(self, item)])


def deliver_all(deliveries: list[tuple[Handle, tuple]]) -> None:
    """Hand items to their handles' queues with one wake-up of each event loop (not one per
    item: a step of a 32-request batch would otherwise wake the HTTP thread 32 times, and
    every wake-up contends for the GIL with the next step)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, tuple]]] = {}
    for handle, item in deliveries:
        by_loop.setdefault(handle.loop, []).append((handle, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
            pass


def _put_all(items: list[tuple[Handle, tuple]]) -> None:
    for handle, item in items:
        handle.queue.put_nowait(item)


@dataclass
class Job:
    kind: str  # "add", "cancel" or "score"
    handle: Handle
    prompts: list[list[int]] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)
    top: int = 0  # score: alternatives per position


class Scheduler:
    """Runs the engine loop on its own thread; see the module docstring."""

    def __init__(self, engine: Engine, max_queue: int, max_score_tokens: int | None = None
                 ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.scorer = PromptScorer(engine, max_score_tokens or engine.capacity,
                                   engine.prefill_chunk)
        self.inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0  # generations accepted and not finished (running + waiting)
        self.owners: dict[int, tuple[Handle, int]] = {}  # engine request id -> (handle, choice)
        self.handle_ids = itertools.count()
        self.stopping = False
        self.failures = 0
        self.cancelled = 0  # generations stopped because their client left
        self.steps, self.step_seconds = 0, 0.0  # engine steps run and the time they took
        self.thread = threading.Thread(target=self._run, name="dsv4-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    # -- called from the event loop ---------------------------------------------------------
    def new_handle(self) -> Handle:
        return Handle(asyncio.get_running_loop(), id=next(self.handle_ids))

    def submit(self, handle: Handle, prompts: list[list[int]], params: list[SamplingParams]
               ) -> None:
        """Queue generations (one per choice) or refuse them all with a 429."""
        self.check_admissible(len(prompts))
        limit = self.engine.cache.slots + self.max_queue
        with self.lock:
            if self.in_flight + len(prompts) > limit:
                raise APIError(429, f"the server is full: {self.in_flight} generations running "
                               f"or queued (limit {limit} = {self.engine.cache.slots} cache slots "
                               f"+ a queue of {self.max_queue}); retry later",
                               code="queue_full", type="rate_limit_error")
            self.in_flight += len(prompts)
        self._send(Job("add", handle, prompts, params))

    def check_admissible(self, count: int) -> None:
        """A 400 for more generations than the server can ever hold: retrying cannot help, so
        it must not be a 429 (retrying clients would retry forever)."""
        limit = self.engine.cache.slots + self.max_queue
        if count > limit:
            raise APIError(400, f"n: the request asks for {count} generations (prompts x n); "
                           f"this server holds at most {limit} ({self.engine.cache.slots} "
                           f"cache slots + a queue of {self.max_queue})", param="n",
                           code="too_many_generations")

    def score(self, handle: Handle, prompt: list[int], top: int) -> None:
        """Ask for the log-probabilities of every prompt token (delivered as "score")."""
        self._send(Job("score", handle, [prompt], top=top))

    def cancel(self, handle: Handle) -> None:
        """The client left: stop its generations and free their cache slots."""
        handle.cancelled = True
        self._send(Job("cancel", handle))

    def stats(self) -> dict:
        engine = self.engine
        cache = engine.cache
        lengths = cache.lengths.tolist()
        running = len(engine.running)
        return {
            "running": running,
            "waiting": max(0, self.in_flight - running),
            "max_batch": cache.slots,
            "max_queue": self.max_queue,
            "capacity_per_request": cache.capacity,
            "cache_tokens_used": sum(lengths),
            "cache_tokens_total": cache.slots * cache.capacity,
            "cache_bytes_used": sum(cache.used_bytes(slot) for slot, n in enumerate(lengths)
                                    if n > 0),
            "cache_bytes_total": cache.bytes_by_kind()["total"],
            "cancelled": self.cancelled,
            "scoring_waiting": len(self.scorer.jobs),
            "scoring_cancelled": self.scorer.cancelled,
            "engine_steps": self.steps,
            "engine_step_seconds": round(self.step_seconds, 6),
            "engine_failures": self.failures,
        }

    def _send(self, job: Job) -> None:
        self.inbox.put(job)
        self.wake.set()

    # -- the scheduler thread ---------------------------------------------------------------
    def _run(self) -> None:
        self.scorer.start()
        while not self.stopping:
            self.wake.clear()  # before draining: a job sent after this sets it again
            self._drain_inbox()
            if self.scorer.has_work():  # one chunk, between engine steps
                self._score_chunk()
            if self.engine.has_work():
                self._step()
            elif not self.scorer.has_work():
                self.wake.wait(timeout=1.0)

    def _drain_inbox(self) -> None:
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                getattr(self, f"_do_{job.kind}")(job)
            except Exception as err:  # noqa: BLE001 — a bad job must not stop the server
                log.error("scheduler job %s failed:\n%s", job.kind, traceback.format_exc())
                job.handle.deliver(("error", None, APIError(500, f"internal error: {err}",
                                                            type="server_error")))

    def _do_add(self, job: Job) -> None:
        if job.handle.cancelled:  # the client left before its request got here
            self._finished(len(job.prompts))
            return
        choice = 0
        for prompt, params, n in sample_runs(job.prompts, job.params, self.engine.cache.slots):
            try:
                rids = self.engine.add_samples(prompt, params, n)
            except ValueError as err:  # validated before; a last line of defence
                self._finished(n)
                job.handle.deliver(("error", None, APIError(400, str(err))))
            else:
                for k, rid in enumerate(rids):
                    self.owners[rid] = (job.handle, choice + k)
            choice += n

    def _do_cancel(self, job: Job) -> None:  # a cancelled scoring job stops at its next chunk
        for rid, (handle, _) in list(self.owners.items()):
            if handle is job.handle:
                self.cancelled += self.engine.cancel(rid)
                del self.owners[rid]
                self._finished(1)

    def _do_score(self, job: Job) -> None:
        if not job.handle.cancelled:
            self.scorer.add(job.handle, job.prompts[0], job.top)

    def _score_chunk(self) -> None:
        job = self.scorer.jobs[0]
        try:
            self.scorer.advance()
        except Exception as err:  # noqa: BLE001 — fail this request, keep serving
            self.scorer.jobs.remove(job)
            log.error("scoring failed:\n%s", traceback.format_exc())
            job.handle.deliver(("error", None, APIError(500, f"internal error while scoring: "
                                                        f"{err}", type="server_error")))

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as err:  # noqa: BLE001 — fail the batch, keep serving
            self.failures += 1
            log.error("engine step failed:\n%s", traceback.format_exc())
            self._fail_everything(err)
            return
        finally:
            self.steps += 1
            self.step_seconds += time.perf_counter() - start
        deliveries = []
        for event in events:
            owner = self.owners.get(event.request_id)
            if owner is None:
                continue
            handle, choice = owner
            deliveries.append((handle, (choice, event)))
            if event.finished:
                del self.owners[event.request_id]
                self._finished(1)
        deliver_all(deliveries)

    def _fail_everything(self, err: Exception) -> None:
        """After a failed step the batch's state is unknown: end every request with a 500."""
        for rid, (handle, _) in list(self.owners.items()):
            self.engine.cancel(rid)
            handle.deliver(("error", None, APIError(500, f"internal error while generating: "
                                                    f"{err}", type="server_error")))
        self._finished(len(self.owners))
        self.owners.clear()

    def _finished(self, count: int) -> None:
        with self.lock:
            self.in_flight -= count


def sample_runs(prompts: list[list[int]], params: list[SamplingParams], max_rows: int):
    """(prompt, params, n) runs of choices that are n samples of one prompt, as
    `Engine.add_samples` makes them (seeds seed, seed+1, ...): fed to the model once."""
    start = 0
    while start < len(prompts):
        first, n = params[start], 1
        while (start + n < len(prompts) and n < max_rows and prompts[start + n] is prompts[start]
               and params[start + n] == sample_params(first, n)):
            n += 1
        yield prompts[start], first, n
        start += n
