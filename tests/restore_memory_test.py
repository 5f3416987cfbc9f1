"""Bounded memory: a restore holds the state about once, and a resumed run never builds a fresh state."""

import pytest

import jaxckpt
from benchmarks import child
from benchmarks.harness import MiB
from jaxckpt.runner import loop
from tests.runs import tiny_config


def test_restore_peaks_near_the_state_size(tmp_path):
    size = 128 * MiB
    total = child.call("benchmarks.restore_peak_rss:write", size, str(tmp_path))
    got = child.call("benchmarks.restore_peak_rss:measure", "jaxckpt", str(tmp_path), size)
    extra = got["peak"] - got["before"]
    # The restored arrays themselves (1.0 x, host memory on CPU) plus the bounded read-ahead
    # (tensorstore's read buffer and ours, 2 x 32 MiB) and some slack; reading everything at
    # once and copying it onto the device peaked at 2.2 x.
    assert extra <= total + 96 * MiB, f"restore peaked at {extra / total:.2f} x the state ({total / MiB:.0f} MiB)"


def test_a_resumed_run_never_builds_a_fresh_state(tmp_path, data_dir, monkeypatch):
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, **{"train.num_steps": 20, "checkpoint.every_steps": 20})
    jaxckpt.run(config, workdir)

    def no_fresh_state(*args, **kwargs):
        raise AssertionError("a resumed run built a fresh initial state beside the restored one")

    monkeypatch.setattr(loop, "fresh_state", no_fresh_state)
    state = jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 30, "checkpoint.every_steps": 20}), workdir)
    assert int(state.step) == 30
    with pytest.raises(AssertionError, match="fresh initial state"):  # the spy does guard the fresh path
        jaxckpt.run(config, tmp_path / "other")
