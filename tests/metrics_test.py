"""Tests for jaxckpt.metrics: JSONL and TensorBoard writers, truncation on resume, curves.png."""

import json
import math
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from jaxckpt.runner import metrics


def test_jsonl_writer_appends_one_object_per_point(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with metrics.JsonlWriter(path) as writer:
        writer.write(1, "train", {"loss": jnp.float32(0.5), "accuracy": np.float64(0.25)})
        writer.write(2, "val", {"loss": 0.75})
        # Flushed per write: visible before close.
        assert len(path.read_text().splitlines()) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
            {"step": 1, "split": "train", "loss": 0.5, "accuracy": 0.25},
            {"step": 2, "split": "val", "loss": 0.75},
    ]


def test_jsonl_writer_appends_to_existing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.JsonlWriter(path) as writer:
        writer.write(1, "train", {"loss": 1.0})
    with metrics.JsonlWriter(path) as writer:
        writer.write(2, "train", {"loss": 0.5})
    assert [p["step"] for p in metrics.read_metrics(path)] == [1, 2]


def test_non_finite_values_are_valid_json_and_read_back_as_nan(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.JsonlWriter(path) as writer:
        writer.write(3, "train", {"loss": float("nan"), "grad_norm": float("inf")})
    line = path.read_text().strip()
    assert json.loads(line) == {"step": 3, "split": "train", "loss": None, "grad_norm": None}
    assert "NaN" not in line and "Infinity" not in line
    (point,) = metrics.read_metrics(path)
    assert math.isnan(point["loss"]) and math.isnan(point["grad_norm"])


@pytest.mark.parametrize("bad", [{"loss": np.ones(3)}, {"step": 1.0}, {"split": 0.0}])
def test_writer_rejects_non_scalars_and_reserved_names(tmp_path, bad):
    with metrics.JsonlWriter(tmp_path / "m.jsonl") as writer:
        with pytest.raises(ValueError, match=next(iter(bad))):
            writer.write(1, "train", bad)


def test_integer_counts_are_written_as_integers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.JsonlWriter(path) as writer:
        writer.write(10, "val", {"loss": np.float32(0.5), "num_examples": np.int64(216), "seen": 3})
    assert path.read_text() == '{"step": 10, "split": "val", "loss": 0.5, "num_examples": 216, "seen": 3}\n'
    (point,) = metrics.read_metrics(path)
    assert type(point["num_examples"]) is int and type(point["loss"]) is float


def test_truncate_after_keeps_points_up_to_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.JsonlWriter(path) as writer:
        for step in (10, 20, 30, 40):
            writer.write(step, "train", {"loss": 1.0 / step})
        writer.write(20, "val", {"loss": 0.1})
    removed = metrics.truncate_after(path, 20)
    assert removed == 2
    assert [(p["step"], p["split"]) for p in metrics.read_metrics(path)] == [
            (10, "train"), (20, "train"), (20, "val")]
    # No temporary files left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    # A resumed run appends after the truncation point without duplicates.
    with metrics.JsonlWriter(path) as writer:
        writer.write(30, "train", {"loss": 0.03})
    assert [p["step"] for p in metrics.read_metrics(path)] == [10, 20, 20, 30]


def test_truncate_after_keeps_the_dropped_points_where_asked(tmp_path):
    path, aside = tmp_path / "metrics.jsonl", tmp_path / "superseded" / "metrics.jsonl"
    aside.parent.mkdir()
    with metrics.JsonlWriter(path) as writer:
        for step, split in ((10, "train"), (20, "train"), (20, "val"), (30, "train"), (40, "val")):
            writer.write(step, split, {"loss": 1.0 / step})
    before = path.read_text().splitlines(keepends=True)
    assert metrics.truncate_after(path, 20, dropped_to=aside) == 2
    assert path.read_text() == "".join(before[:3])
    assert aside.read_text() == "".join(before[3:])  # byte for byte, in file order
    assert metrics.truncate_after(path, 20, dropped_to=aside) == 0 and aside.read_text() == "".join(before[3:])


def test_truncate_after_drops_a_torn_last_line_and_tolerates_missing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert metrics.truncate_after(path, 5) == 0
    assert not path.exists()
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
    assert [p["step"] for p in metrics.read_metrics(path)] == [1]
    metrics.truncate_after(path, 100)
    assert path.read_text() == '{"step": 1, "split": "train", "loss": 1.0}\n'


def test_read_metrics_names_the_corrupt_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\nnot json\n{"step": 2, "split": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        metrics.read_metrics(path)


def test_format_metrics():
    text = metrics.format_metrics({"loss": jnp.float32(0.312745), "accuracy": 0.9, "examples": np.int64(128)})
    assert text == "loss=0.3127 accuracy=0.9 examples=128"


def _event_files(logdir):
    return [p for p in logdir.rglob("*") if p.name.startswith("events.out.tfevents")]


def test_tensorboard_writer_writes_tagged_scalars(tmp_path):
    logdir = tmp_path / "tensorboard"
    with metrics.TensorBoardWriter(logdir) as writer:
        writer.write(5, "val", {"accuracy": 0.5})
    (event_file,) = _event_files(logdir)
    # The tag is stored verbatim in the serialized event protos.
    assert b"val/accuracy" in event_file.read_bytes()


def test_open_writers_fans_out_to_jsonl_and_tensorboard(tmp_path):
    with metrics.open_writers(tmp_path) as writer:
        assert isinstance(writer, metrics.MultiWriter)
        writer.write(1, "train", {"loss": 2.0})
        writer.flush()
    assert metrics.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "split": "train", "loss": 2.0}]
    assert _event_files(tmp_path / "tensorboard")


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_curves_writes_png_with_train_and_val(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.JsonlWriter(path) as writer:
        for step in range(1, 6):
            writer.write(step, "train", {"loss": 1.0 / step, "accuracy": step / 10})
        writer.write(5, "val", {"loss": 0.3, "accuracy": 0.4})
    out = metrics.plot_curves(path, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert _is_png(out)
    first_size = out.stat().st_size
    # Redrawing replaces the file in place and leaves no temporary files behind.
    metrics.plot_curves(path, out)
    assert _is_png(out) and out.stat().st_size == first_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_curves_follow_the_umask_and_a_killed_plot_leaves_no_temporary_for_long(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.JsonlWriter(path) as writer:
        writer.write(1, "train", {"loss": 1.0})
    stale = tmp_path / ".curves.png.k1ll3d.tmp"  # what a plot killed mid-write leaves
    stale.write_bytes(b"half a png")
    old = os.umask(0o022)
    try:
        out = metrics.plot_curves(path, tmp_path / "curves.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # mkstemp's 0600 made it private
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


@pytest.mark.parametrize("content", ["", '{"step": 1, "split": "train", "loss": 1.0}\n'])
def test_plot_curves_with_no_or_only_train_points(tmp_path, content):
    path = tmp_path / "metrics.jsonl"
    path.write_text(content)
    out = metrics.plot_curves(path, tmp_path / "curves.png", main_metric="f1")
    assert _is_png(out)
