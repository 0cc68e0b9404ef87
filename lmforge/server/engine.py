"""Continuous batching: requests join a running batch at the next step and leave it when done.

    engine = Engine(model, max_batch=16, max_queue=64)        # one thread owns the model
    generation = engine.submit(prompt_ids, Sampling(max_tokens=50, temperature=0), on_event)
    generation.cancel()                                       # a client went away: its row leaves at the next step
    vectors = engine.call(embed, texts)                       # any other use of the model, between two steps

One thread per served model runs the loop below and is the only one that touches the model; the
HTTP side hands it requests and gets events back through `on_event` (called on the engine thread).

    while running:
        run the queued calls (embeddings, classification)
        prefill the waiting requests that fit (one left-padded batch), sample their first token,
        and join their KV cache to the running one (`KVCache.join`: right-aligned, more left padding)
        one decode step for every running row: logits -> each row's own sampling -> its text
        rows that hit end-of-text, a stop string, max_tokens or a cancel leave (`KVCache.select`),
        and the padding every row has is cut away (`KVCache.compact`)

A step is the same forward pass the generate loop makes (`lmforge.infer.generate`); what the batch
loop adds is per-row sampling (each request has its own temperature, top-p and seed) and the cache
surgery that lets rows come and go. Each row's positions and attention see only its own tokens, so a
request batched with others gets the tokens it would get alone (up to float rounding). Models that do
not continue a token sequence with a plain KV cache (seq2seq, VAE) generate one request at a time
through `model.generate` instead, on the same thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from lmforge import kernels
from lmforge.infer import left_pad, warp_logits
from lmforge.infer.generate import cut_at_stop, showable_length

log = logging.getLogger("lmforge.server")

DECODE_ROWS = 8  # the batch size the generation kernels are chosen for (lmforge.kernels.generating)
ROOM = 64  # positions the KV cache grows by when it is full


class QueueFull(Exception):
    """The engine's queue of waiting requests is full (the server answers 503 with Retry-After)."""


@dataclass(frozen=True)
class Sampling:
    """How one request samples: OpenAI's fields, checked by the HTTP layer."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the text (not included)
    stop_ids: frozenset[int] = frozenset()  # tokens that end the text: end-of-text, end of turn
    seed: int | None = None


@dataclass
class Event:
    """What a generation reports: a piece of new text, then once `finish_reason` ("stop" or "length")."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Generation:
    """One request's row: its prompt, sampling, the tokens so far and the text already reported."""

    def __init__(self, prompt_ids: Sequence[int], sampling: Sampling, on_event: Callable[[Event], None]):
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.on_event = on_event
        self.tokens: list[int] = []
        self.shown = 0  # characters of the text already reported
        self.cancelled = threading.Event()
        self.generator: torch.Generator | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        """Stop generating (the client went away): the row leaves the batch at the next step."""
        self.cancelled.set()


class Engine:
    """The batch loop of one model on its own thread (see the module docstring)."""

    def __init__(self, model: Any, max_batch: int = 16, max_queue: int = 64, use_kernels: bool | None = None):
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.use_kernels = use_kernels
        self.batched = hasattr(model, "new_cache") and not hasattr(model, "generation_batches")
        self.waiting: queue.Queue[Generation] = queue.Queue()
        self.calls: queue.Queue[tuple[Callable, tuple, Future]] = queue.Queue()
        self.running: list[Generation] = []
        self.cache = None
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------
    # the HTTP side

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    @property
    def active(self) -> int:
        return len(self.running)

    def submit(self, prompt_ids: Sequence[int], sampling: Sampling, on_event: Callable[[Event], None]) -> Generation:
        """Queue a request; `on_event` gets its events on the engine thread. QueueFull when the queue is full."""
        if self.waiting.qsize() + len(self.running) >= self.max_batch + self.max_queue:
            raise QueueFull(f"{len(self.running)} requests are generating and {self.waiting.qsize()} waiting")
        generation = Generation(prompt_ids, sampling, on_event)
        if sampling.seed is not None:
            generation.generator = torch.Generator().manual_seed(sampling.seed)
        self.waiting.put(generation)
        self.wake.set()
        return generation

    def call(self, function: Callable, *args: Any) -> Future:
        """Run `function(model, *args)` on the engine thread between two steps; its result as a Future."""
        future: Future = Future()
        self.calls.put((function, args, future))
        self.wake.set()
        return future

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------------------------------
    # the engine thread

    def _loop(self) -> None:
        with kernels.generating(self.model, rows=DECODE_ROWS, enabled=self.use_kernels), torch.inference_mode():
            while not self.stopping:
                if not self.running and self.waiting.empty() and self.calls.empty():
                    self.wake.wait(timeout=1.0)
                    self.wake.clear()
                    continue
                try:
                    self._run_calls()
                    self._admit()
                    if self.running:
                        self._step()
                except Exception:  # a bug must not leave clients hanging: end every row with an error
                    log.exception("engine step failed")
                    for generation in self.running:
                        generation.on_event(Event("", finish_reason="error"))
                    self.running, self.cache = [], None

    def _run_calls(self) -> None:
        while not self.calls.empty():
            function, args, future = self.calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(self.model, *args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)

    def _admit(self) -> None:
        """Prefill the waiting requests that fit into the batch, and join them to it."""
        joining: list[Generation] = []
        while len(self.running) + len(joining) < self.max_batch and not self.waiting.empty():
            generation = self.waiting.get()
            if not generation.cancelled.is_set():
                joining.append(generation)
        if not joining:
            return
        if not self.batched:  # seq2seq / VAE: one at a time through the model's own generate
            for generation in joining:
                self._generate_alone(generation)
            return
        tokens, pad = left_pad([g.prompt_ids for g in joining], "cpu")
        tokens, pad = tokens.to(self._device), pad.to(self._device)
        room = max(g.sampling.max_tokens for g in joining)
        cache = self.model.new_cache(len(joining), tokens.shape[1] + min(room, ROOM), pad if pad.any() else None)
        logits = self.model(tokens, cache=cache, last_only=True)[:, -1]
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.join(cache, room=ROOM)
        self.running += joining
        self._sample_and_report(logits, joining)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _step(self) -> None:
        """One decode step for every running row, then the finished rows leave."""
        self.cache.compact(room=ROOM)
        last = torch.tensor([[g.tokens[-1]] for g in self.running], device=self._device)
        logits = self.model(last, cache=self.cache, last_only=True)[:, -1]  # (B, V)
        self._sample_and_report(logits, self.running)

    def _sample_and_report(self, logits: torch.Tensor, rows: list[Generation]) -> None:
        """Choose each row's next token by its own sampling, report its text, and let finished rows leave."""
        chosen = self._sample(logits, rows)
        now = time.perf_counter()
        for generation, token in zip(rows, chosen):
            generation.tokens.append(token)
            if generation.first_token_at is None:
                generation.first_token_at = now
            self._report(generation)
        keep = [i for i, g in enumerate(self.running) if not self._finished(g)]
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in keep]
            if keep:
                self.cache.select(torch.tensor(keep, device=self._device))
            else:
                self.cache = None

    def _sample(self, logits: torch.Tensor, rows: list[Generation]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, generation in enumerate(rows):
            s = generation.sampling
            if s.temperature == 0:
                out.append(greedy[i])
                continue
            probs = warp_logits(logits[i:i + 1], s.temperature, s.top_k, s.top_p).softmax(dim=-1)
            out.append(int(torch.multinomial(probs, 1, generator=generation.generator)))
        return out

    def _report(self, generation: Generation) -> None:
        """Hand the client the text that is safe to show, and the end once the row is finished."""
        s = generation.sampling
        ended_by_token = generation.tokens[-1] in s.stop_ids
        ids = generation.tokens[:-1] if ended_by_token else generation.tokens
        whole = self.tokenizer.decode(ids)
        text = cut_at_stop(whole, s.stop)
        if len(text) < len(whole) or ended_by_token:
            reason = "stop"
        elif len(generation.tokens) >= s.max_tokens:
            reason = "length"
        else:
            reason = None
        if reason is None:
            safe = showable_length(text, s.stop)
            if safe > generation.shown:
                generation.on_event(Event(text[generation.shown:safe]))
                generation.shown = safe
            return
        generation.on_event(Event(text[generation.shown:], reason, len(generation.prompt_ids), len(ids)))
        generation.shown = len(text)
        generation.finish_reason = reason

    @staticmethod
    def _finished(generation: Generation) -> bool:
        return generation.finish_reason is not None or generation.cancelled.is_set()

    def _generate_alone(self, generation: Generation) -> None:
        """A model without a plain KV cache (seq2seq, VAE): the model's own generate, streamed."""
        s = generation.sampling
        prompt = self.tokenizer.decode(generation.prompt_ids)
        stream = (lambda piece: generation.on_event(Event(piece))) if not generation.cancelled.is_set() else None
        text = self.model.generate(prompt, max_new_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                                   top_p=s.top_p, stop=list(s.stop), seed=s.seed, stream=stream)[0]
        n = len(self.tokenizer.encode(text))
        generation.on_event(Event("", "length" if n >= s.max_tokens else "stop", len(generation.prompt_ids), n))
