"""Tests for jaxckpt.runner.curves: curves.png drawn from metrics.jsonl."""


import os
import stat

import pytest

from jaxckpt.runner import curves, writers


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_curves_writes_png_with_train_and_val(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with writers.JsonlWriter(path) as writer:
        for step in range(1, 6):
            writer.write(step, "train", {"loss": 1.0 / step, "accuracy": step / 10})
        writer.write(5, "val", {"loss": 0.3, "accuracy": 0.4})
    out = curves.plot_curves(path, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert _is_png(out)
    first_size = out.stat().st_size
    # Redrawing replaces the file in place and leaves no temporary files behind.
    curves.plot_curves(path, out)
    assert _is_png(out) and out.stat().st_size == first_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


@pytest.mark.parametrize("content", ["", '{"step": 1, "split": "train", "loss": 1.0}\n'])
def test_plot_curves_with_no_or_only_train_points(tmp_path, content):
    path = tmp_path / "metrics.jsonl"
    path.write_text(content)
    out = curves.plot_curves(path, tmp_path / "curves.png", main_metric="f1")
    assert _is_png(out)


def test_curves_follow_the_umask_and_a_killed_plot_leaves_no_temporary_for_long(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with writers.JsonlWriter(path) as writer:
        writer.write(1, "train", {"loss": 1.0})
    stale = tmp_path / ".curves.png.k1ll3d.tmp"  # what a plot killed mid-write leaves
    stale.write_bytes(b"half a png")
    old = os.umask(0o022)
    try:
        out = curves.plot_curves(path, tmp_path / "curves.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # mkstemp's 0600 made it private
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]
