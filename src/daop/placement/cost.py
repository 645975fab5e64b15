"""Cost model over a HardwareProfile: CPU, copy and GPU time of one expert for n tokens."""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from daop.hardware import HardwareProfile


def interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear in n, extrapolated linearly past the last measured point."""
    if x <= xs[0]:
        return ys[0]
    i = bisect.bisect_left(xs, x)
    if i == len(xs):
        i -= 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class CostModel:
    """Times in milliseconds; with no profile every miss is cheapest on the CPU. `scale`: (CPU, copy)
    factors on the profile's times (`side_by_side`)."""

    profile: HardwareProfile | None = None
    scale: tuple[float, float] = (1.0, 1.0)

    def cpu_ms(self, n: int) -> float:
        p = self.profile
        return interpolate(p.cpu_token_counts, p.cpu_expert_ms, n) * self.scale[0] if p else 1.0

    def gpu_ms(self, n: int) -> float:
        p = self.profile
        return interpolate(p.gpu_token_counts, p.gpu_expert_ms, n) if p else 0.0

    def copy_ms(self) -> float:
        return self.profile.copy_pinned_ms * self.scale[1] if self.profile else float("inf")

    def shared_factors(self) -> tuple[float, float] | None:
        """(CPU, copy) slow-down while both channels read host memory, where the profile measured it."""
        p = self.profile
        return (p.shared_cpu_factor, p.shared_copy_factor) if p and p.shared_cpu_factor > 0 and p.shared_copy_factor > 0 else None

    def side_by_side(self) -> "CostModel":
        """The same costs at the rates the channels keep while both read host memory (a CPU expert
        and a copy each slowed by the profile's shared factors), where the profile measured them."""
        factors = self.shared_factors()
        return CostModel(self.profile, factors) if factors and self.scale == (1.0, 1.0) else self

    def copy_beats_cpu(self, n: int) -> bool:
        """Copying the expert and running it on the GPU finishes before the CPU would."""
        return self.copy_ms() + self.gpu_ms(n) < self.cpu_ms(n)
