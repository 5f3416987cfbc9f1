"""Running one measurement in a fresh Python process: a faked device count, or a clean peak RSS.

The benchmark runner's own process has imported JAX with the devices it found, and its peak
resident memory includes everything measured before; a question about 8 devices or about peak
memory is asked of a new process instead. The child prints its result as one JSON line.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Mapping

ROOT = pathlib.Path(__file__).resolve().parents[1]


def call(function: str, *args: Any, devices: int | None = None, env: Mapping[str, str] | None = None,
         timeout: float = 900) -> Any:
    """Runs `module:function(*args)` in a new Python process and returns what it returned (JSON).

    Args:
      function: `"benchmarks.sharded_save:measure"`.
      *args: JSON-able arguments.
      devices: fake this many CPU devices (`--xla_force_host_platform_device_count`); None keeps
        the environment's setting.
      env: variables to set in the child only (e.g. an object-store emulator's endpoint).
      timeout: seconds before the child is killed.

    Raises:
      RuntimeError: with the child's stderr, if it failed.
    """
    module, name = function.split(":")
    code = (f"import json, sys; from {module} import {name}; "
            f"print(json.dumps({name}(*json.loads(sys.argv[1]))))")
    child_env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                 **(env or {})}
    if devices is not None:
        child_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], cwd=ROOT, env=child_env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{function}{args} failed in a child process:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (`VmHWM`), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
    """This process's resident set size now (`VmRSS`), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
