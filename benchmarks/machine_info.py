"""The CPU model a benchmark ran on, for the ``Machine:`` line of its results.

Imported as ``benchmarks.machine_info`` (``python -m benchmarks.boundspeed``, the tests, the
scripts that put the repository root on ``sys.path``) and as ``machine_info`` by the scripts
run as ``python benchmarks/<name>.py``, whose own directory is on ``sys.path``.
"""

from __future__ import annotations

import platform

__all__ = ["cpu_model", "cpu_name"]


def cpu_model() -> str | None:
    """The ``model name`` of the first CPU in ``/proc/cpuinfo``; ``None`` where there is none
    (not Linux, or a kernel that does not say)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model, or else what :mod:`platform` knows (processor, else architecture)."""
    return cpu_model() or platform.processor() or platform.machine()
