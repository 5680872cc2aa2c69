"""How quiet the machine was during a CPU benchmark: timings on a shared machine move when other
processes take the cores, so each benchmark reports the load and the spread of its own repeats."""

from __future__ import annotations

import os


def report_quietness(spread: float, limit: float, unit: str) -> tuple[float, float, float]:
    """Print the load average and ``spread`` (slowest / fastest repeat of one ``unit``: side, mode,
    case); warn when it is above ``limit``. Returns the load average (for the results file)."""
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) on {os.cpu_count()} cores; "
          f"worst slowest/fastest repeat of one {unit}: {spread:.2f}x")
    if spread > limit:
        print(f"WARNING: repeats of one {unit} differ by {spread:.2f}x (more than {limit}x): other processes were "
              "competing for the cores (OpenMP workers stall when descheduled); rerun on a quiet machine")
    return load
