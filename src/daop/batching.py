"""Iteration-level batching: sequences of different lengths decode together, joining and leaving
between steps, each with its own sampling, stop strings, token budget and seed.

The KV cache has `max_batch` rows of `max_len` positions, allocated once. The rows of decoding
sequences are kept contiguous (a finished sequence's row is refilled from the last row), so a
decode step runs `Decoder.decode` over rows [0, R) with one position per row: no padding, and
expert routing only for real tokens. One iteration (`Batcher.step`) runs at most one prefill
chunk of the oldest waiting sequence (a long prompt spreads over several iterations, so running
sequences keep decoding), then one decode step for every decoding sequence. With `mix_prefill`
(`mix_by_default`: on unless DAOP_MIX_PREFILL=0),
where the decode step is not one captured graph (offloaded experts, a CPU device) the chunk and the step
run as one pass (`Decoder.decode_and_prefill`): attention apart, each layer's experts once for
both, so a host-resident expert that the prompt and the batch both route to is read once, not
twice. With `prefill_first`
no decode step runs while a sequence can still be admitted or is prefilling: every prompt that fits
is prefilled, then all rows decode together (`generate_tokens`, a benchmark's batch point).

On CUDA, a decode step is captured once per (rows, cache length) and replayed, as a single
sequence's step is: whole on the all-GPU path, in pieces between MoE calls for offloaded runners.

Placement rule for runners that adapt to a sequence (DAOP's per-sequence placement): each new
sequence's prefill adapts the placement from where it stands, without resetting it while other
sequences run; the runner restarts from the calibrated placement only when the batch is empty.
Exact policies give every sequence the tokens it would get alone (greedy).
Shapes: R decoding rows, V vocab.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from daop.engine import Engine, GenerationStats, TextStream
from daop.errors import DaopError
from daop.generate import DEVICE_OOM, guarded, start_sequence
from daop.model.layers import KVCache
from daop.runtime.decode_step import (CapturedStep, PiecewiseStep, StepInputs, cache_length, capture_kind, capture_step,
                                      captures)
from daop.sampling import Sampler, SamplingParams

DEFAULT_CHUNK = 512  # prompt tokens per prefill chunk
log = logging.getLogger("daop.batching")


def mix_by_default() -> bool:
    """Whether prompt chunks share the decode step's pass when the caller does not say: yes, on any
    device (`Batcher.mixes` still keeps them apart where the step is one captured graph). Measured
    faster both where a short prompt's own pass costs about what a decode step does (the shipped
    model on the 2-core CPU: 1.16x the tokens/s in-process, 1.05x through the server) and where
    both passes read host experts (an 8-layer Mixtral-shaped model at daop-exact 0.5 on an H200
    host with the AMX CPU kernel: 78.1 / 78.8 against 67.5 tokens/s through the server, max batch 8;
    README's server section). DAOP_MIX_PREFILL=1 or 0 decides instead."""
    env = os.environ.get("DAOP_MIX_PREFILL", "")
    if env in ("0", "1"):
        return env == "1"
    return True


@dataclass
class Sequence:
    """One request in the batch. `emit(kind, payload)` receives ("text", piece) as text becomes
    safe to send, then one final ("done", stats) or ("cancelled", None) or ("error", error): the
    DaopError of a failed step, or a message (a prompt refused by `add`). Without a tokenizer (a
    synthetic model) no text is sent and stop strings do not apply; `tokens` holds the ids."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[str, Any], None]
    cancelled: Callable[[], bool] = lambda: False
    stats: GenerationStats = field(default_factory=GenerationStats)
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS excluded
    ignore_eos: bool = False  # run to the budget through EOS (the server's warm-up)
    # filled in by the batcher
    row: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    token: int = -1  # the last sampled token, fed at the next decode step
    budget: int = 0
    length: int = 0  # cache positions it reads: as a sequence alone of its length would (cache_length)
    sampler: Sampler | None = None
    text: TextStream | None = None
    first_token_at: float = 0.0

    @property
    def position(self) -> int:
        """Where the next decode step writes: after the prompt and every fed token."""
        return len(self.prompt) + self.stats.generated_tokens - 1


class Batcher:
    """Runs many sequences on one engine, one iteration at a time (`step`), from one thread.
    A step that fails (out of memory) ends its sequences with an ("error", DaopError) event."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_len: int | None = None, chunk: int = DEFAULT_CHUNK,
                 prefill_first: bool = False, mix_prefill: bool | None = None) -> None:
        if max_batch < 1:
            raise DaopError(f"--max-batch must be >= 1, got {max_batch}")
        self.engine, self.decoder = engine, engine.decoder
        self.max_batch, self.chunk, self.prefill_first = max_batch, max(1, chunk), prefill_first
        # a prompt chunk shares its FFN pass with the decode step (`mixes`); None: `mix_by_default`
        self.mix_prefill = mix_by_default() if mix_prefill is None else mix_prefill
        self.runner_key: tuple | None = None  # the expert runner and routing its captured steps read (batch_for)
        self.max_len = min(max_len or engine.config.context_length, engine.config.context_length)
        self.cache = guarded(self.decoder, "allocation of the batch KV cache", KVCache, engine.config, max_batch,
                             self.max_len, self.decoder.device, self.decoder.dtype)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None  # in the row after the decoding ones
        self.decoding: list[Sequence] = []  # row i holds decoding[i]
        self.inputs: dict[int, StepInputs] = {}
        self.graphs: dict[tuple[int, int], CapturedStep | PiecewiseStep] = {}  # (rows, cache length) -> captured decode step
        self.capture = True  # turned off for good if a capture fails

    @property
    def running(self) -> int:
        return len(self.decoding) + (self.prefilling is not None)

    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.decoding)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; an empty prompt or one that leaves no room in a cache row is refused
        at once with an error event (nothing else is touched)."""
        if not seq.prompt:
            seq.emit("error", "the prompt is empty")
            return
        room = self.max_len - len(seq.prompt)
        if room < 1:
            seq.emit("error", f"the prompt has {len(seq.prompt)} tokens; this server holds at most {self.max_len} "
                              f"tokens per sequence (prompt and completion)")
            return
        seq.budget = min(seq.params.max_new_tokens, room)
        seq.length = min(self.max_len, cache_length(self.decoder, len(seq.prompt) + seq.budget))
        seq.stats.prompt_tokens = len(seq.prompt)
        self.waiting.append(seq)

    def step(self) -> None:
        """One iteration: drop cancelled sequences, run one prefill chunk, run one decode step."""
        self._drop_cancelled()
        if self.prefilling is None and self.waiting and self.running < self.max_batch:
            self._admit(self.waiting.popleft())
        hold = self.prefill_first and self.prefilling_phase()
        if self.prefilling is not None and self.decoding and not hold and self.mixes():
            return self._decode_and_prefill()
        if self.prefilling is not None:
            self._prefill_chunk()
        if self.decoding and not hold:
            self._decode()

    def mixes(self) -> bool:
        """Whether a prompt chunk runs in one pass with the decode step (`Decoder.decode_and_prefill`):
        wherever the decode step is not one captured graph (experts offloaded, whose host reads the two
        then share; a CPU device), with the model's own routing (a replayed or recorded one follows
        one pass at a time)."""
        dec = self.decoder
        if not self.mix_prefill or dec.routing is not dec.model_routing:
            return False
        return capture_kind(dec, len(self.decoding)) != "step"

    def prefilling_phase(self) -> bool:
        """A sequence is prefilling or could be admitted now (prefill_first holds decode steps meanwhile)."""
        return self.prefilling is not None or bool(self.waiting and self.running < self.max_batch)

    # --- internals ---

    def _admit(self, seq: Sequence) -> None:
        if not self.decoding and self.prefilling is None:
            start_sequence(self.decoder)  # the batch was empty: start from the calibrated placement
        seq.row = len(self.decoding)
        seq.sampler = Sampler(seq.params, seq.prompt)
        seq.text = TextStream(self.engine.tokenizer, seq.params.stop) if self.engine.tokenizer is not None else None
        self.prefilling = seq

    def _prefill_chunk(self) -> None:
        seq = self.prefilling
        assert seq is not None
        start, end = seq.prefilled, min(len(seq.prompt), seq.prefilled + self.chunk)
        ids = torch.tensor([seq.prompt[start:end]])
        self.decoder.experts.set_phase("prefill")
        t0 = time.perf_counter()
        try:
            logits = guarded(self.decoder, lambda: f"prefill of {len(seq.prompt)} prompt tokens", self.decoder.forward,
                             ids, start, self.cache.rows(seq.row, seq.row + 1, seq.length))
        except DaopError as exc:
            self.prefilling = None
            self._fail_all(exc, [seq])
            return
        seq.stats.prefill_s += time.perf_counter() - t0
        seq.prefilled = end
        self._join(seq, logits)

    def _join(self, seq: Sequence, logits: torch.Tensor) -> None:
        """A prefilling sequence whose prompt is all in the cache starts decoding, with its first token
        from the prompt's last logits [1, V]."""
        if seq.prefilled < len(seq.prompt) or self.prefilling is not seq:
            return
        self.prefilling = None
        seq.first_token_at = time.perf_counter()
        self.decoding.append(seq)
        self._take(seq, int(seq.sampler(logits)[0]))

    def _decode_and_prefill(self) -> None:
        """One pass for the decode step and the prefilling sequence's next prompt chunk."""
        seq = self.prefilling
        assert seq is not None
        R, inputs = len(self.decoding), self._step_inputs()
        start, end = seq.prefilled, min(len(seq.prompt), seq.prefilled + self.chunk)
        self.decoder.experts.set_phase("prefill")
        self.decoder.routing.begin(start, end - start)
        length = max(s.length for s in self.decoding)
        t0 = time.perf_counter()
        try:
            logits, first = guarded(self.decoder, lambda: f"decode of a batch of {R} sequences with a prefill of "
                                    f"{len(seq.prompt)} prompt tokens", self.decoder.decode_and_prefill, inputs.ids,
                                    inputs.pos, self.cache.rows(0, R, length), torch.tensor([seq.prompt[start:end]]),
                                    start, self.cache.rows(seq.row, seq.row + 1, seq.length))
        except DaopError as exc:
            self.prefilling = None
            self._fail_all(exc, list(self.decoding) + [seq])
            return
        seq.stats.prefill_s += time.perf_counter() - t0
        seq.prefilled = end
        self._take_rows(logits)  # while seq is prefilling: a finished row's move keeps its row after theirs
        self._join(seq, first)

    def _step_inputs(self) -> StepInputs:
        """The decode step's ids and positions, loaded for the decoding rows."""
        R = len(self.decoding)
        inputs = self.inputs.get(R)
        if inputs is None:
            inputs = self.inputs[R] = StepInputs(R, self.decoder.device, per_row=True)
        inputs.load([s.token for s in self.decoding], [s.position for s in self.decoding])
        return inputs

    def _decode(self) -> None:
        R, inputs = len(self.decoding), self._step_inputs()
        self.decoder.experts.set_phase("decode")
        self.decoder.routing.begin(min(s.position for s in self.decoding), 1)
        # each row reads the cache length it would have alone (the rotary choice of a longrope model
        # depends on it); the step reads the longest of them
        length = max(s.length for s in self.decoding)
        try:
            logits = guarded(self.decoder, lambda: f"decode of a batch of {R} sequences", self._run_step,
                             inputs, self.cache.rows(0, R, length))
        except DaopError as exc:
            self._fail_all(exc, list(self.decoding))
            return
        self._take_rows(logits)

    def _take_rows(self, logits: torch.Tensor) -> None:
        """Each decoding row's next token from its logits [R, V]."""
        seqs = list(self.decoding)
        plain = [s.params.greedy and not s.params.penalised for s in seqs]
        best = logits.argmax(-1).tolist() if any(plain) else []  # greedy rows: one read for all of them
        for i, seq in enumerate(seqs):
            self._take(seq, best[i] if plain[i] else int(seq.sampler(logits[i:i + 1])[0]))

    def _run_step(self, inputs: StepInputs, cache: KVCache) -> torch.Tensor:
        """One decode step over the cache rows given: captured per (rows, length) where the routing
        stays on the device (`decode_step.captures`), else eager."""
        key = (cache.batch, cache.max_len)
        if key not in self.graphs and self.capture and captures(self.decoder, cache.batch):
            try:
                self.graphs[key] = capture_step(self.decoder, cache, inputs)
            except DEVICE_OOM:
                raise
            except Exception as exc:  # noqa: BLE001 - a step that cannot be captured still runs, eagerly
                self.capture = False
                log.warning("decode steps of the batch run uncaptured: capture failed (%s: %s)", type(exc).__name__, exc)
        graph = self.graphs.get(key)
        if graph is None:
            return self.decoder.decode(inputs.ids, inputs.pos, cache)
        return graph.replay().clone()

    def _take(self, seq: Sequence, token: int) -> None:
        """A sampled token: the end (EOS), or text and maybe the end (stop string, budget)."""
        if token in self.engine.eos_ids and not seq.ignore_eos:
            seq.stats.finish_reason = "stop"
            return self._finish(seq, "done")
        seq.stats.generated_tokens += 1
        seq.stats.decode_s = time.perf_counter() - seq.first_token_at
        seq.token = token
        seq.tokens.append(token)
        piece = seq.text.push(token) if seq.text is not None else ""
        if piece:
            seq.emit("text", piece)
        if seq.text is not None and seq.text.stopped:
            seq.stats.finish_reason = "stop"
            return self._finish(seq, "done")
        if seq.stats.generated_tokens >= seq.budget:
            seq.stats.finish_reason = "length"
            self._finish(seq, "done")

    def _finish(self, seq: Sequence, kind: str, payload: Any = None) -> None:
        """Take seq out of the batch (its row refilled from the last decoding row) and send its end."""
        if seq in self.decoding:
            i, last = self.decoding.index(seq), len(self.decoding) - 1
            if i != last:
                moved = self.decoding[last]  # its token of this step may be written already: one more position
                self.cache.move_row(last, i, min(self.max_len, moved.position + 2))
                moved.row = i
                self.decoding[i] = moved
            self.decoding.pop()
            if self.prefilling is not None and self.prefilling.row == last + 1:
                # keep the prefilling row right after the decoding ones
                self.cache.move_row(last + 1, last, self.prefilling.prefilled)
                self.prefilling.row = last
        if kind == "done":
            piece = seq.text.finish() if seq.text is not None else ""
            if seq.text is not None and seq.text.stopped:
                seq.stats.finish_reason = "stop"
            if piece:
                seq.emit("text", piece)
            payload = seq.stats
        seq.emit(kind, payload)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled()]:
            self.waiting.remove(seq)
            seq.emit("cancelled", None)
        if self.prefilling is not None and self.prefilling.cancelled():
            seq, self.prefilling = self.prefilling, None
            seq.emit("cancelled", None)
        for seq in [s for s in self.decoding if s.cancelled()]:
            self._finish(seq, "cancelled")

    def _fail_all(self, message: Any, failed: list[Sequence]) -> None:
        """A step failed (out of memory): its sequences end with the error, the runner is reset by
        `guarded`, and the batch goes on with the rest."""
        for seq in failed:
            if seq in self.decoding:
                self._finish(seq, "error", message)
            else:
                seq.emit("error", message)

    def fail_all(self, error: Any) -> None:
        """End every running sequence with `error` (an unexpected failure); the runner starts over."""
        failed = list(self.decoding) + ([self.prefilling] if self.prefilling is not None else [])
        self.prefilling = None
        self._fail_all(error, failed)
        start_sequence(self.decoder)

    def cancel_all(self) -> None:
        """End every sequence as cancelled (server shutdown; a batch call that raised)."""
        for seq in list(self.waiting):
            seq.emit("cancelled", None)
        self.waiting.clear()
        if self.prefilling is not None:
            self.prefilling.emit("cancelled", None)
            self.prefilling = None
        for seq in list(self.decoding):
            self._finish(seq, "cancelled")


def generate_many(engine: Engine, prompts: list[Any], params: SamplingParams | list[SamplingParams],
                  max_batch: int = 8, chunk: int = DEFAULT_CHUNK) -> list[dict[str, Any]]:
    """Run several prompts through one Batcher until all are done: per prompt its text, token count
    and finish reason (for scripts and tests; the server feeds a Batcher as requests arrive)."""
    batcher = Batcher(engine, max_batch=max_batch, chunk=chunk)
    results: list[dict[str, Any]] = [{"text": "", "finish_reason": None} for _ in prompts]
    plist = params if isinstance(params, list) else [params] * len(prompts)

    def sink(i: int) -> Callable[[str, Any], None]:
        def emit(kind: str, payload: Any) -> None:
            if kind == "text":
                results[i]["text"] += payload
            elif kind == "done":
                results[i].update(finish_reason=payload.finish_reason, tokens=payload.generated_tokens)
            else:
                results[i].update(finish_reason=kind, error=None if payload is None else str(payload))
        return emit

    for i, (prompt, p) in enumerate(zip(prompts, plist)):
        batcher.add(Sequence(engine.encode(prompt), p, sink(i)))
    with torch.inference_mode():
        while not batcher.idle():
            batcher.step()
    return results


def batch_for(engine: Engine, rows: int, max_len: int) -> Batcher:
    """The engine's Batcher for `generate_tokens`, kept for the next call so its KV rows and captured
    steps are reused: replaced (the old one freed first) when a call needs more rows or positions, or
    when the engine's expert runner or routing tensors changed (its graphs would read stale memory)."""
    dec = engine.decoder
    key = (id(dec.experts), getattr(dec.routing, "graph_key", None))
    old = engine.batch_runner
    if old is not None and old.max_batch >= rows and old.max_len >= max_len and old.runner_key == key:
        return old
    engine.batch_runner = None
    del old
    if dec.device.type == "cuda":
        torch.cuda.empty_cache()
    batcher = Batcher(engine, max_batch=rows, max_len=max_len, prefill_first=True)
    batcher.runner_key = key
    engine.batch_runner = batcher
    return batcher


def batch_for_prompts(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> Batcher:
    """`batch_for` with a row for every prompt, each as long as the prompt alone would have
    (`cache_length`), and every prompt prefilled whole (as it is alone)."""
    needed = max(cache_length(engine.decoder, len(p) + max_new_tokens) for p in prompts)
    batcher = batch_for(engine, len(prompts), min(needed, engine.config.context_length))
    batcher.chunk = max(len(p) for p in prompts)
    return batcher


def generate_tokens(engine: Engine, prompts: list[list[int]], params: SamplingParams,
                    stats: GenerationStats) -> list[list[int]]:
    """Every prompt prefilled (each whole, one after another), then decode steps over all rows until
    each ends (EOS, a stop string, its budget): token ids per prompt, EOS excluded, each what the
    prompt gets alone under an exact policy (greedy).

    stats: prefill_s until the last prompt is prefilled, decode_s the decode steps after it,
    extra["counters_after_prefill"] the expert counters in between, generated_tokens the longest
    row's count (decode steps + 1). A failed step (out of memory) raises its DaopError."""
    batcher = batch_for_prompts(engine, prompts, params.max_new_tokens)
    errors: list[Any] = []
    seqs = [Sequence(p, params, lambda kind, payload: errors.append(payload) if kind == "error" else None)
            for p in prompts]
    try:
        t0 = time.perf_counter()
        for seq in seqs:
            batcher.add(seq)
        drive(batcher, batcher.prefilling_phase, errors)
        t1 = time.perf_counter()
        stats.prefill_s, stats.extra["counters_after_prefill"] = t1 - t0, engine.counters()
        drive(batcher, lambda: not batcher.idle(), errors)
        stats.decode_s = time.perf_counter() - t1
    except BaseException:
        batcher.cancel_all()  # the batcher is kept for the next call: empty, the runner started over
        start_sequence(engine.decoder)
        raise
    stats.prompt_tokens = sum(len(p) for p in prompts)
    stats.generated_tokens = max(s.stats.generated_tokens for s in seqs)
    stats.finish_reason = "length" if any(s.stats.finish_reason == "length" for s in seqs) else "stop"
    return [s.tokens for s in seqs]


def drive(batcher: Batcher, until: Callable[[], bool], errors: list[Any]) -> None:
    """Step the batcher while `until()` holds; the first error event is raised."""
    while not errors and until():
        batcher.step()
    if errors:
        raise errors[0] if isinstance(errors[0], BaseException) else DaopError(str(errors[0]))
