"""One model, batch size 1: requests take a place in a bounded FIFO queue and decode one at a time.

Decoding is the library's (`hydra_generate` / `ar_generate` through `stream_text`); every step runs on one
worker thread so the event loop stays free to stream, queue and notice disconnects. A request that goes
away (its client disconnected, so its task is cancelled) releases its place at once; the step already
running on the worker finishes first, then the next request in line starts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hydra.model.generate import DecodeConfig, ar_generate, hydra_generate, mean_accept_length, stream_text

FINISH_REASONS = {
    "eos": "stop",
    "stop": "stop",
    "max_new_tokens": "length",
    "length": "length",
    "max_steps": "length",
}


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    prompt_ids: list[int]
    config: DecodeConfig
    speculative: bool
    stop: list[str] = field(default_factory=list)


@dataclass
class Stats:
    """What one reply cost: tokens, verification steps, tau and decoding time (queueing excluded)."""

    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose prefill the prompt cache saved
    accept_lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def usage(self) -> dict:
        tau = mean_accept_length(self.accept_lengths)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "accepted_tokens_per_step": None if math.isnan(tau) else round(tau, 4),
            "decode_steps": len(self.accept_lengths),
            "decode_seconds": round(self.seconds, 4),
        }


class Ticket:
    """A place in the queue, held from admission until the reply ends (or its client leaves)."""

    def __init__(self, engine: Engine):
        self.engine, self.holding, self.released = engine, False, False

    async def acquire(self) -> None:
        await self.engine._lock.acquire()
        if self.released:  # its response ended while it waited (the stream left unclosed): pass the turn on
            self.engine._lock.release()
            raise asyncio.CancelledError
        self.holding = True

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.engine.pending -= 1
        if self.holding:
            self.holding = False
            self.engine._lock.release()


class Engine:
    def __init__(self, model, has_heads: bool, max_queue: int = 16):
        self.model, self.tokenizer, self.has_heads = model, model.tokenizer, has_heads
        self.max_queue = max_queue
        self.pending = 0  # admitted and not finished: the running request + those waiting
        self.served = self.cancelled = 0
        self._lock = asyncio.Lock()  # FIFO: waiters are woken in arrival order
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hydra-decode")
        self._mean_seconds = 1.0  # running mean of reply times, for Retry-After

    def health(self) -> dict:
        running = int(self._lock.locked())
        return {
            "status": "ok",
            "running": running,
            "waiting": self.pending - running,
            "served": self.served,
            "cancelled": self.cancelled,
            "max_queue": self.max_queue,
        }

    def admit(self) -> Ticket:
        """A place in line, or QueueFull (-> 503) when `max_queue` requests already wait behind the
        running one."""
        if self.pending >= 1 + self.max_queue:
            raise QueueFull(max(1, math.ceil(self._mean_seconds * self.pending)))
        self.pending += 1
        return Ticket(self)

    def steps(self, job: Job):
        """The decoding iterator; input errors (ValueError) surface here, before the request is queued."""
        generate = hydra_generate if job.speculative else ar_generate
        return stream_text(self.tokenizer, generate(self.model, job.prompt_ids, job.config))

    async def run(
        self, ticket: Ticket, job: Job, steps, stats: Stats, waiting_heartbeat: float | None = None
    ) -> AsyncIterator[tuple[str, str | None]]:
        """Yields (text, finish_reason): text deltas as they are accepted, then ("", reason) once. While
        queued, yields (None, None) every `waiting_heartbeat` seconds (a stream can send a keep-alive)."""
        finished = False
        try:
            acquiring = asyncio.ensure_future(ticket.acquire())
            try:
                while not acquiring.done():
                    await asyncio.wait({acquiring}, timeout=waiting_heartbeat)
                    if not acquiring.done():
                        yield None, None
            finally:
                if not acquiring.done():
                    acquiring.cancel()
            acquiring.result()  # CancelledError if the ticket was released meanwhile: never decode unheld
            loop = asyncio.get_running_loop()
            stops = StopStrings(job.stop)
            start = time.perf_counter()
            reason = None
            tokens: list[int] = []
            while reason is None:
                item = await loop.run_in_executor(self._worker, next, steps, None)
                if item is None:  # the decoder ended without a reason (max_new_tokens <= 0)
                    reason = "max_new_tokens"
                    break
                delta, step = item
                # read before the next job
                if not stats.accept_lengths and job.config.prompt_cache is not None:
                    stats.cached_tokens = job.config.prompt_cache.reused_tokens
                tokens += step.tokens
                stats.completion_tokens = len(tokens)
                stats.accept_lengths.append(step.accept_length)
                reason = step.finish_reason
                text, hit = stops.feed(delta, final=reason is not None)
                if hit:
                    reason = "stop"
                    stats.completion_tokens = _first_stop_prefix(self.tokenizer, tokens, len(step.tokens),
                                                                 stops.stop)
                stats.seconds = time.perf_counter() - start
                if text:
                    yield text, None
            self.served += 1
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * stats.seconds
            finished = True
            yield "", FINISH_REASONS[reason]
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                self.cancelled += 1
            raise
        finally:
            ticket.release()


def _first_stop_prefix(tokenizer, tokens: list[int], last_step: int, stop: list[str]) -> int:
    """How many tokens a plain decoder would have produced before stopping: the shortest prefix whose text
    contains a stop string. Only the last step's tokens can complete it (earlier text held none); a
    speculative step may have decided more tokens after it, which are not part of the reply."""
    for n in range(len(tokens) - last_step + 1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        if any(s in text for s in stop):
            return n
    return len(tokens)


class StopStrings:
    """Cuts the reply at the first stop string; text that could still begin one is held back."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.buffer = ""

    def feed(self, delta: str, final: bool) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        self.buffer += delta
        if not self.stop:
            out, self.buffer = self.buffer, ""
            return out, False
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        keep = (
            0
            if final
            else max(
                (k for s in self.stop for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0
            )
        )
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return out, False
