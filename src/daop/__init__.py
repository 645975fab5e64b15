"""daop: Mixture-of-Experts inference with experts split between GPU and host memory.

`Engine` is imported on first use, so that light modules (executors, hardware profiles) can be
imported with torch alone, e.g. by scripts/cpu_channel_probe.py on a test host.
"""
from daop.errors import DaopError
from daop.sampling import SamplingParams

__all__ = ["Engine", "DaopError", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":
        from daop.engine import Engine

        return Engine
    raise AttributeError(f"module 'daop' has no attribute {name!r}")
