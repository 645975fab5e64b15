"""A measured timeline of offloaded decode steps: when each layer's pieces happen on the three
resources (the driving thread, the CPU expert pool, the copy stream), in ms from the step's start.

Off by default; `OffloadedExperts.timeline` set to a Timeline turns it on (scripts/step_timeline.py).
Host marks are `perf_counter` times on the driving thread; CPU spans are taken on the thread that
computes; copies are timed with CUDA events against one event recorded at the step's start, after
a synchronize, so both clocks start together (the synchronize is the one perturbation it adds).
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Step:
    t0: float
    ref: Any  # CUDA event at the step's start, or None on a CPU device
    marks: list[tuple[int, str, float]] = field(default_factory=list)  # (layer, name, ms)
    cpu: list[tuple[int, str, float, float, float]] = field(default_factory=list)  # (layer, kind, submitted, start, end)
    copies: list[tuple[int, int, str, Any, Any, float]] = field(default_factory=list)  # (layer, expert, kind, start ev, end ev, queued)
    end_ms: float = 0.0


class Timeline:
    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.current: Step | None = None
        self.lock = threading.Lock()

    def now(self) -> float:
        return (time.perf_counter() - self.current.t0) * 1000 if self.current else 0.0

    def begin_step(self) -> None:
        ref = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            ref = torch.cuda.Event(enable_timing=True)
            ref.record()
        self.current = Step(time.perf_counter(), ref)

    def end_step(self) -> None:
        if self.current is None:
            return
        if self.current.ref is not None:
            torch.cuda.synchronize()
        self.current.end_ms = self.now()
        self.steps.append(self.current)
        self.current = None

    def mark(self, layer: int, name: str) -> None:
        if self.current is not None:
            self.current.marks.append((layer, name, self.now()))

    def cpu_span(self, layer: int, kind: str, submitted: float, start: float, end: float) -> None:
        """A CPU job: perf_counter times when it was submitted, began computing and ended."""
        step = self.current
        if step is not None:
            with self.lock:
                step.cpu.append((layer, kind, (submitted - step.t0) * 1000, (start - step.t0) * 1000, (end - step.t0) * 1000))

    def copy_events(self) -> tuple[Any, Any] | None:
        if self.current is None or self.current.ref is None:
            return None
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def copy_span(self, layer: int, expert: int, kind: str, events: tuple[Any, Any]) -> None:
        if self.current is not None:
            self.current.copies.append((layer, expert, kind, events[0], events[1], self.now()))

    def raw(self, step: Step) -> dict:
        """One step as recorded: marks, CPU jobs and copies (GPU times from the step's start event)."""
        return {
            "step_ms": round(step.end_ms, 2),
            "marks": [(layer, name, round(ms, 2)) for layer, name, ms in step.marks],
            "cpu": [(layer, kind, round(a, 2), round(b, 2), round(c, 2)) for layer, kind, a, b, c in step.cpu],
            "copies": [(layer, e, kind, round(q, 2), round(step.ref.elapsed_time(e0), 2), round(step.ref.elapsed_time(e1), 2))
                       for layer, e, kind, e0, e1, q in step.copies] if step.ref is not None else [],
        }

    def summary(self, skip: int = 0) -> dict:
        """Median per layer and per piece over the recorded steps (after `skip`): host marks, CPU and
        copy spans (start, end), and the step's length."""
        steps = self.steps[skip:]
        marks: dict[tuple[int, str], list[float]] = defaultdict(list)
        cpu: dict[tuple[int, str], list[tuple[float, float, float]]] = defaultdict(list)
        copies: dict[tuple[int, str], list[tuple[float, float, float]]] = defaultdict(list)
        counts: dict[str, float] = defaultdict(float)
        for s in steps:
            for layer, name, ms in s.marks:
                marks[(layer, name)].append(ms)
            for layer, kind, sub, a, b in s.cpu:
                cpu[(layer, kind)].append((sub, a, b))
                counts[f"cpu_{kind}"] += 1
            for layer, _, kind, ev0, ev1, queued in s.copies:
                copies[(layer, kind)].append((queued, s.ref.elapsed_time(ev0), s.ref.elapsed_time(ev1)))
                counts[f"copy_{kind}"] += 1
        med = statistics.median

        def spans(d):
            return {f"{layer}:{kind}": [round(med(x[i] for x in v), 2) for i in range(3)] for (layer, kind), v in sorted(d.items())}

        return {
            "steps": len(steps),
            "step_ms": round(med(s.end_ms for s in steps), 2) if steps else None,
            "marks": {f"{layer}:{name}": round(med(v), 2) for (layer, name), v in sorted(marks.items())},
            "cpu_spans": spans(cpu),  # submitted, started, ended
            "copy_spans": spans(copies),  # queued (host), started, ended (GPU)
            "per_step": {k: round(v / max(len(steps), 1), 2) for k, v in counts.items()},
            "cpu_busy_ms": round(med(sum(b - a for _, _, _, a, b in s.cpu) for s in steps), 2) if steps else None,
            "copy_busy_ms": round(med(sum(s.ref.elapsed_time(e1) - s.ref.elapsed_time(e0) for *_, e0, e1, _ in s.copies)
                                      for s in steps), 2) if steps and steps[0].ref is not None else None,
        }
