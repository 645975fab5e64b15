"""Decode steps of two versions of one engine side by side, for the CPU probes: batches of the
same prompts, stepped alternately (each after its own setting), so a drift of the machine's speed
falls on both sides."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.batching import Batcher, Sequence  # noqa: E402
from daop.engine import Engine  # noqa: E402
from daop.sampling import SamplingParams  # noqa: E402


def prefilled_batch(engine: Engine, rows: int, new_tokens: int, seed: int, max_len: int | None = None) -> Batcher:
    """A batch of `rows` random 10-token prompts (seeded), every prompt prefilled, decoding next."""
    b = Batcher(engine, max_batch=rows, max_len=max_len)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(rows):
        b.add(Sequence(torch.randint(3, engine.config.vocab_size, (10,), generator=gen).tolist(),
                       SamplingParams(max_new_tokens=new_tokens), lambda kind, payload: None))
    with torch.inference_mode():
        while b.prefilling is not None or b.waiting:
            b.step()
    return b


def alternate(sides: dict[str, tuple[Batcher, Callable[[], None]]], count: int) -> dict[str, float]:
    """`count` steps of each side's batch, the sides taking turns, each step after its setting
    function; median milliseconds per step of each side."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    with torch.inference_mode():
        for _ in range(count):
            for name, (batch, setting) in sides.items():
                setting()
                t0 = time.perf_counter()
                batch.step()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def same_tokens(a: Batcher, b: Batcher) -> bool:
    return [s.tokens for s in a.decoding] == [s.tokens for s in b.decoding]
