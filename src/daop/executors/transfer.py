"""Transfers between host and GPU: the one owner of the copy stream, pinned staging and events.

Every asynchronous copy is paired with an event; host code reads a device->host copy only after
its event has completed, and a slot is overwritten only after the last compute that read it.
On a CPU-only machine the "GPU" is the CPU and every transfer is a plain synchronous copy.
"""
from __future__ import annotations

import torch


class Transfer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slot_released: dict[int, torch.cuda.Event] = {}
        # A ring of staging buffers: a CPU job reads its activations while later layers stage theirs.
        # Each job is collected within the next layer, and a layer stages at most twice, so four suffice.
        self.staging = [torch.empty(0) for _ in range(4)]
        self.next_staging = 0

    def copy_expert(self, src: tuple[torch.Tensor, ...], dst: tuple[torch.Tensor, ...], slot: int) -> "torch.cuda.Event | None":
        """Copy host expert weights into a GPU slot on the copy stream; returns the completion event."""
        if not self.cuda:
            for d, s in zip(dst, src):
                d.copy_(s)
            return None
        with torch.cuda.stream(self.stream):
            released = self.slot_released.get(slot)
            if released is not None:
                self.stream.wait_event(released)
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, event: "torch.cuda.Event | None") -> None:
        """Make the compute stream wait for a copy (no host blocking)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def release_slot(self, slot: int) -> None:
        """Record that all compute queued so far that reads `slot` must finish before it is overwritten."""
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.slot_released[slot] = event

    def to_host(self, x: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """Start copying activations [N, D] into pinned staging; the reader must wait on the event."""
        if not self.cuda:
            return x, None
        n, i = x.numel(), self.next_staging
        self.next_staging = (i + 1) % len(self.staging)
        buf = self.staging[i]
        if buf.numel() < n or buf.dtype != x.dtype:
            buf = self.staging[i] = torch.empty(max(n, 2 * buf.numel()), dtype=x.dtype, pin_memory=True)
        host = buf[:n].view(x.shape)
        host.copy_(x, non_blocking=True)
        event = torch.cuda.Event(blocking=True)  # a host thread waits on it: sleep, do not spin
        event.record(torch.cuda.current_stream(self.device))
        return host, event

    def to_device(self, y: torch.Tensor) -> torch.Tensor:
        return y.to(self.device, non_blocking=False) if self.cuda else y
