"""Runs every benchmark side by side with its baselines, prints a table and writes JSON records.

  python -m benchmarks.run                 # full sizes (~1 GiB states; 10+ minutes on 2 cores)
  python -m benchmarks.run --quick         # under 3 minutes on 2 cores
  python -m benchmarks.run --smoke         # seconds per benchmark; checks that everything runs
  python -m benchmarks.run --quick --json results.json --only save_large,restore_large

Each record is `{"name", "value", "unit", "baseline", "baseline_name", "ratio", "goal"}`; `ratio`
is oriented so that higher is better for jaxckpt and 1.0 is parity. Exit status 1 if a benchmark
raised (its error is printed; the others still run and are written).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import platform
import sys
import tempfile
import time
import traceback
from typing import Callable

# Benchmarks import `experiments.*`: make the repository root importable when run as a script.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Record  # noqa: E402

BENCHMARKS = (
    "save_large",
    "restore_large",
    "small_leaves",
    "async_overhead",
    "loop_overhead",
    "graft_scaling",
    "resume_latency",
    "partial_read",
    "sharded_save",
    "sharded_restore",
    "restore_peak_rss",
    "remote",
)
"""Module names under `benchmarks/`, in the order they run."""


def _parse(argv: list[str] | None, with_only: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: under 3 minutes on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs (for tests)")
    parser.add_argument("--json", type=pathlib.Path, help="write the records to this JSON file")
    parser.add_argument("--dir", type=pathlib.Path,
                        help="scratch directory on the disk to measure (default: a new temporary one)")
    if with_only:
        parser.add_argument("--only", default="", help="comma-separated benchmark names to run")
    return parser.parse_args(argv)


def _mode(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def versions() -> dict[str, str]:
    """Versions of what is measured, for the README and the JSON's neighbours."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "flax", "optax", "numpy", "torch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def run_all(names: list[str], mode: str, scratch: pathlib.Path,
            report: Callable[[str], None] = print) -> tuple[list[Record], list[str]]:
    """Runs benchmarks `names` in `mode` under `scratch`; returns `(records, failed names)`."""
    records, failed = [], []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        try:
            got = module.run(mode, scratch)
        except Exception:  # one broken benchmark must not hide the others' figures
            failed.append(name)
            report(f"[{name}] FAILED:\n{traceback.format_exc()}")
            continue
        records += got
        report(f"[{name}] {time.perf_counter() - start:.1f}s: " + ", ".join(
            f"{r.name}={r.ratio:.3g}" if r.ratio is not None else f"{r.name}={r.value:.3g}{r.unit}" for r in got))
    return records, failed


def _write(records: list[Record], path: pathlib.Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv, with_only=True)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    mode = _mode(args)
    print(f"mode={mode} {time.strftime('%Y-%m-%d %H:%M:%S %Z')} " + " ".join(f"{k}={v}" for k, v in versions().items()))
    with tempfile.TemporaryDirectory(prefix="jaxckpt-bench-", dir=args.dir) as scratch:
        start = time.perf_counter()
        records, failed = run_all(names, mode, pathlib.Path(scratch))
    print()
    print(harness.format_table(records))
    print(f"\n{len(records)} records in {time.perf_counter() - start:.0f}s" + (f"; FAILED: {failed}" if failed else ""))
    _write(records, args.json)
    return 1 if failed else 0


def main_for(run: Callable[[str, pathlib.Path], list[Record]]) -> None:
    """`python -m benchmarks.<one>`: runs one benchmark with the runner's flags (no --only)."""
    args = _parse(None, with_only=False)
    with tempfile.TemporaryDirectory(prefix="jaxckpt-bench-", dir=args.dir) as scratch:
        records = run(_mode(args), pathlib.Path(scratch))
    print(harness.format_table(records))
    _write(records, args.json)


if __name__ == "__main__":
    sys.exit(main())
