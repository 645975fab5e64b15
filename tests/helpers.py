"""Helpers shared by several test modules: loading a script from scripts/, writing a hardware profile."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from daop.config import load_config
from daop.hardware import HardwareProfile

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"daop_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_profile(model_dir, out_dir: Path, copy_ms: float, cpu_ms: float, dtype: str = "float32",
                  expert_format: str = "", gpu_ms: tuple[float, float] = (0.05, 0.4)) -> str:
    """An explicit hardware profile for the checkpoint in model_dir: one expert copy takes copy_ms, a
    CPU expert cpu_ms for 1 token (8x for 64), a GPU expert gpu_ms for 1 and 64 tokens. Its path."""
    c = load_config(model_dir)
    profile = HardwareProfile(
        hidden_size=c.hidden_size, intermediate_size=c.expert_intermediate_size, dtype=dtype, expert_bytes=1,
        copy_pinned_ms=copy_ms, copy_pageable_ms=copy_ms, cpu_threads=1, cpu_token_counts=(1, 64),
        cpu_expert_ms=(cpu_ms, 8 * cpu_ms), gpu_token_counts=(1, 64), gpu_expert_ms=gpu_ms, expert_format=expert_format)
    out = Path(out_dir) / f"profile-{expert_format or dtype}-{copy_ms}-{cpu_ms}.json"
    profile.save(out)
    return str(out)
