"""Where a run's hardware profile comes from: a file the user named, this machine's cache, or a fresh
calibration, and why.

The cache lives in $XDG_CACHE_HOME/daop/profiles (default ~/.cache/daop/profiles). A cached profile
is keyed by everything its numbers depend on: host name, CPU model and capability, cores, device,
torch and CUDA versions, expert shape and dtype, the requested CPU threads and mode, and the CPU kernel. It is used
only when the key it recorded equals this run's and its CPU numbers are plausible; otherwise the
machine is measured again (a few attempts while the numbers stay implausible) and only a plausible
result is written back.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from daop.config import ModelConfig
from daop.errors import DaopError
from daop.executors.cpu import kernel_name
from daop.hardware import SCHEMA, HardwareProfile, calibrate, host_identity
from daop.quant import ExpertFormat

ATTEMPTS = 3  # calibrations tried while the measured numbers stay implausible
NOISY = "implausible_after_attempts"  # provenance key of a profile cached although every attempt looked noisy


@dataclass(frozen=True)
class ProfileRequest:
    """What a run needs a profile for: one expert shape on one device, with the user's CPU options."""

    config: ModelConfig
    dtype: torch.dtype
    device: torch.device
    file: str | HardwareProfile | None = None  # --hardware-profile, or a profile the caller already has
    cpu_threads: int | None = None
    cpu_mode: str | None = None
    fmt: ExpertFormat | None = None  # the routed experts' stored format; None: the model's dtype

    @property
    def expert_format(self) -> ExpertFormat:
        return self.fmt or ExpertFormat("auto", self.dtype)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def key(self) -> dict[str, str]:
        c = self.config
        return {**host_identity(self.device), "expert": f"{c.hidden_size}x{c.expert_intermediate_size}",
                "dtype": self.dtype_name, "experts_stored": self.expert_format.name, "cpu_threads": str(self.cpu_threads or "auto"),
                "cpu_mode": self.cpu_mode or "auto", "cpu_kernel": kernel_name(self.device.type == "cuda"), "schema": SCHEMA}


@dataclass(frozen=True)
class ProfileSource:
    """kind: 'file', 'cached' or 'fresh'; profile is None for 'fresh' until measured."""

    kind: str
    path: Path | None
    reason: str
    profile: HardwareProfile | None = None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "daop" / "profiles"


def cache_path(request: ProfileRequest) -> Path:
    key = request.key()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    device = re.sub(r"[^A-Za-z0-9_.-]+", "_", key["gpu"] if request.device.type == "cuda" else "cpu")
    return cache_dir() / f"{device}-{key['expert']}-{key['experts_stored']}-{digest}.json"


def key_difference(recorded: dict[str, str], wanted: dict[str, str]) -> str:
    changed = [f"{k} {recorded.get(k, '?')!r} -> {v!r}" for k, v in wanted.items() if recorded.get(k) != v]
    return ", ".join(changed) or "none"


def locate(request: ProfileRequest) -> ProfileSource:
    """Which profile this run would use and why, without measuring anything."""
    c = request.config
    if isinstance(request.file, HardwareProfile):
        return ProfileSource("file", None, "given by the caller", request.file)
    if request.file:
        path = Path(request.file)
        profile = HardwareProfile.load(path, c.hidden_size, c.expert_intermediate_size, request.dtype_name, request.expert_format.name)
        doubt = profile.implausible()  # used as given, but said: a cached one like it would be measured again
        return ProfileSource("file", path, "given by --hardware-profile" + (f"; its CPU numbers look noisy ({doubt})" if doubt else ""),
                             profile)
    path = cache_path(request)
    if not path.is_file():
        return ProfileSource("fresh", path, "no cached profile for this machine, versions and options")
    try:
        profile = HardwareProfile.load(path, c.hidden_size, c.expert_intermediate_size, request.dtype_name, request.expert_format.name)
        recorded = json.loads(profile.provenance.get("cache_key", "{}"))
    except (DaopError, json.JSONDecodeError) as exc:
        return ProfileSource("fresh", path, f"cached profile unreadable ({exc})")
    wanted = request.key()
    if recorded != wanted:
        return ProfileSource("fresh", path, f"cached profile was measured elsewhere ({key_difference(recorded, wanted)})")
    measured = f"measured {profile.provenance.get('measured_at', '?')} on this machine"
    doubt = profile.implausible()
    if doubt and NOISY not in profile.provenance:
        return ProfileSource("fresh", path, f"cached profile is implausible ({doubt})")
    if doubt:  # every attempt was noisy when it was measured: measuring again each run would cost as much again
        return ProfileSource("cached", path, f"{measured}, where {ATTEMPTS} calibrations in a row looked noisy ({doubt}); "
                             f"delete {path} to measure again", profile)
    return ProfileSource("cached", path, measured, profile)


def measure(request: ProfileRequest) -> tuple[HardwareProfile, str | None]:
    """A quick calibration, repeated while it looks implausible; (profile, remaining doubt). When no
    attempt is plausible, the one with the lowest CPU times: a busy host only slows a measurement."""
    c = request.config
    attempts = []
    for _ in range(ATTEMPTS):
        profile = calibrate(c.hidden_size, c.expert_intermediate_size, request.dtype, request.device,
                            request.cpu_threads, quick=True, mode=request.cpu_mode, fmt=request.expert_format)
        profile.provenance["cache_key"] = json.dumps(request.key(), sort_keys=True)
        doubt = profile.implausible()
        if doubt is None:
            return profile, None
        attempts.append(profile)
    best = min(attempts, key=lambda p: sum(p.cpu_expert_ms))
    return best, best.implausible()


def obtain(request: ProfileRequest) -> tuple[HardwareProfile, ProfileSource]:
    """The profile to use (file, cache, or measured now and cached) and its source. A measurement
    still implausible after ATTEMPTS calibrations is cached too, marked (provenance NOISY), so a
    noisy host is not calibrated ATTEMPTS times again on every run; `locate` says so."""
    source = locate(request)
    if source.profile is not None:
        return source.profile, source
    profile, doubt = measure(request)
    if doubt is not None:
        profile.provenance[NOISY] = doubt
    try:
        profile.save(source.path)
    except OSError:
        pass
    note = f"; still implausible after {ATTEMPTS} attempts ({doubt}), cached with a note saying so" if doubt else ""
    return profile, ProfileSource("fresh", source.path, source.reason + note, profile)
