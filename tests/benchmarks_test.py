"""The benchmark runner: `--quick` runs every benchmark and writes well-formed records (no timing is asserted)."""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.harness import Record
from benchmarks.run import BENCHMARKS
from tests.runs import ROOT

# Record names are part of the contract (issue 5); extra records (plain Orbax, torch) may follow.
GOALS = {
    "save_large": "ratio >= 0.9",
    "save_large_orbax_tuned": "ratio >= 1.0",
    "restore_large": "ratio >= 0.9",
    "restore_large_orbax_tuned": "ratio >= 1.0",
    "small_leaves": "ratio >= 5",
    "async_overhead": "ratio >= 0.98",
    "loop_overhead": "ratio >= 0.97",
    "graft_scaling": "value < 1 s",
    "resume_latency": "ratio >= 0.833",
    "partial_read": "ratio >= 0.909",
    "sharded_save": "ratio >= 0.9",
    "sharded_restore": "ratio >= 0.9",
    "restore_peak_rss": "value < 1.3",
}


@pytest.mark.slow
def test_quick_runs_every_benchmark_and_writes_records(tmp_path):
    out = tmp_path / "records.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out),
                           "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = json.loads(out.read_text())
    names = [r["name"] for r in records]
    assert set(GOALS) <= set(names) and len(names) == len(set(names))
    for r in records:
        assert set(r) == {"name", "value", "unit", "baseline", "baseline_name", "ratio", "goal"}, r
        record = Record(**r)
        assert math.isfinite(record.value) and record.unit and record.baseline_name
        assert record.ratio is None or (math.isfinite(record.ratio) and record.ratio > 0)
        assert record.baseline is None or record.baseline > 0
        assert record.goal == GOALS.get(record.name), r
        assert record.met() in (None, True, False)
    assert all(any(n == b or n.startswith(b + "_") for b in BENCHMARKS) for n in names), names
    assert "name" in done.stdout and "baseline is" in done.stdout  # the table
    assert {"remote_save", "remote_restore", "save_large_orbax_tuned", "restore_large_orbax_tuned"} <= set(names)


def test_unknown_benchmark_is_refused():
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown benchmark(s) ['nope']" in done.stderr
