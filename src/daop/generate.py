"""One sequence through the model: reset -> prefill -> decode steps, for every caller.

Single-sequence generation, benchmark replay, evaluation and routing profiles drive the model
through DecodeSession (batches: `daop.batching`, which starts sequences with `start_sequence` too),
so none of them can forget to start the runner's sequence from the calibrated placement or to
switch it to the decode phase. Device out-of-memory errors
become OutOfMemory naming the step, with the runner left ready for the next sequence.
Shapes: T prompt tokens, V vocab.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from daop.errors import OutOfMemory
from daop.model.decoder import Decoder
from daop.runtime.decode_step import Stepper

DEVICE_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # the allocator's error


def start_sequence(decoder: Decoder) -> None:
    """The runner's next sequence starts from the calibrated placement, in the prefill phase."""
    decoder.experts.reset()
    decoder.experts.set_phase("prefill")


def guarded(decoder: Decoder, what: str | Callable[[], str], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call fn; a device out-of-memory error becomes OutOfMemory naming `what` (a callable is only
    asked on failure, so decode steps format nothing), with the runner reset for the next sequence.

    The failed request's tensors are only referenced from the frames of the error being handled,
    so they are freed when it is.
    """
    try:
        return fn(*args, **kwargs)
    except (DEVICE_OOM, MemoryError) as exc:
        first = (str(exc).strip().splitlines() or ["out of memory"])[0][:200]
        where = "host" if isinstance(exc, MemoryError) else decoder.device.type.upper()
    start_sequence(decoder)
    if decoder.device.type == "cuda":
        torch.cuda.empty_cache()
    what = what() if callable(what) else what
    raise OutOfMemory(f"out of {where} memory during {what} ({first}); a shorter prompt, fewer new tokens, "
                      f"a smaller --max-context or a lower --gpu-memory / --expert-ratio leaves more room")


class DecodeSession:
    """One prompt, then one decode step per call of `step`.

    Creating a session resets the expert runner; `prefill` runs the prompt and switches the runner
    to decode; `step` feeds one token. Counters as of the end of prefill are kept, so the decode
    phase's own counts can be told apart. (Several sequences at once: `daop.batching.Batcher`.)
    """

    def __init__(self, decoder: Decoder, prompt: Sequence[int], max_new_tokens: int) -> None:
        self.decoder = decoder
        self.prompt_len = len(prompt)
        self.ids = torch.tensor([list(prompt)])
        self.position = 0
        self.prefill_s = 0.0
        self.counters_after_prefill: dict[str, float] = {}
        start_sequence(decoder)
        self.what = f"prefill of {self.prompt_len} prompt tokens"
        self.stepper = guarded(decoder, self.what, Stepper, decoder, self, self.prompt_len + max_new_tokens)
        self.cache = self.stepper.cache

    def prefill(self, all_logits: bool = False) -> torch.Tensor:
        """Logits [1, V] of the last prompt position (all positions [1, T, V] with all_logits)."""
        t0 = time.perf_counter()
        logits = guarded(self.decoder, self.what, self.decoder.forward, self.ids, 0, self.cache, all_logits=all_logits)
        if self.decoder.device.type == "cuda":
            torch.cuda.synchronize(self.decoder.device)
        self.prefill_s = time.perf_counter() - t0
        self.position = self.prompt_len
        self.counters_after_prefill = self.decoder.experts.totals()
        self.decoder.experts.set_phase("decode")
        return logits

    def step(self, token: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Feed one token ([1], on the host or the device) at the next position; logits [1, V]. Runs
        `Decoder.decode`, captured as a CUDA graph where it can be (`daop.runtime.decode_step`)."""
        self.decoder.routing.begin(self.position, 1)
        logits = guarded(self.decoder, lambda: f"decode at position {self.position}", self.stepper.run, token, self.position)
        self.position += 1
        return logits
