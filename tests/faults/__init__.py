"""Injecting I/O errors below Python: an LD_PRELOAD shim (`inject.c`) for subprocesses.

Orbax reads and writes array bytes in tensorstore's C++ code, so mocking Python's `open` proves
nothing about them. The shim fails libc's open/read/write/fsync/rename calls on matching paths with
a chosen errno (see `inject.c` for what it covers). It must be loaded when a process starts, so
faults are injected into a subprocess:

    env = faults.env("/state/d/", op="read", errno="EIO", log=tmp_path / "injected")
    done = faults.run_python("import jaxckpt; ...", env=env)
    assert faults.injected(tmp_path / "injected")  # the fault did fire
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = pathlib.Path(__file__).with_name("inject.c")
OPS = ("open", "read", "write", "fsync", "rename")


@functools.cache
def shim() -> pathlib.Path:
    """The compiled shim (built once per test session into a temporary directory); skips without gcc."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("fault injection needs Linux and a C compiler (gcc) for its LD_PRELOAD shim")
    out = pathlib.Path(tempfile.mkdtemp(prefix="jaxckpt-faults-")) / "inject.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-U_FORTIFY_SOURCE", "-Wall", "-o", str(out), str(SOURCE),
                    "-ldl"], check=True, capture_output=True, text=True)
    return out


def env(path: str, *, op: str = "read", errno: str = "EIO", after: int = 0, times: int = -1,
        log: os.PathLike | str | None = None) -> dict[str, str]:
    """Environment variables that make a subprocess fail `op` calls on paths containing `path`.

    Args:
      path: substring of the file paths to fail (e.g. "/state/d/": the OCDBT data files of every step).
      op: "open", "read", "write", "fsync" or "rename", or several joined with ",".
      errno: the errno name ("EIO", "ENOSPC", ...) the failing calls set.
      after: let this many matching calls succeed first.
      times: then fail this many (-1: every one after).
      log: a file to which each injected failure appends "call errno path-or-fd", to check it fired.
    """
    if unknown := set(op.split(",")) - set(OPS):
        raise ValueError(f"unknown fault op(s) {sorted(unknown)}; use {', '.join(OPS)}")
    out = {"LD_PRELOAD": str(shim()), "JAXCKPT_FAULT_PATH": path, "JAXCKPT_FAULT_OP": op,
           "JAXCKPT_FAULT_ERRNO": errno, "JAXCKPT_FAULT_AFTER": str(after), "JAXCKPT_FAULT_TIMES": str(times)}
    if log is not None:
        out["JAXCKPT_FAULT_LOG"] = str(log)
    return out


def injected(log: os.PathLike | str) -> list[str]:
    """The failures a shim logged (one line each: call, errno, path or fd)."""
    log = pathlib.Path(log)
    return log.read_text().splitlines() if log.exists() else []


def run_python(code: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `python -c code args...` on this checkout's jaxckpt, one CPU device, with `env` added."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout, check=False)
