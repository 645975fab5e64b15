#!/usr/bin/env python3
"""Where the driving thread's Python time goes in offloaded decode: cProfile around
scripts/step_timeline.py's loop (same arguments), printing the top functions by own time and the
daop functions by cumulative time. Profiling slows every Python call, so read the shares, not the
absolute times.

    python3 scripts/host_profile.py --policies daop-exact --ratios 0.5 --steps 16
"""
from __future__ import annotations

import cProfile
import io
import pstats
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    script = str(Path(__file__).with_name("step_timeline.py"))
    sys.argv = [script, *sys.argv[1:]]
    prof = cProfile.Profile()
    prof.enable()
    runpy.run_path(script, run_name="__main__")
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumtime").print_stats("daop/", 45)
    print(out.getvalue())
