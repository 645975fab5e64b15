"""daop: Mixture-of-Experts inference with experts split between GPU and host memory."""
from daop.engine import Engine
from daop.errors import DaopError
from daop.sampling import SamplingParams

__all__ = ["Engine", "DaopError", "SamplingParams"]
__version__ = "0.1.0"
