"""Tests for jaxckpt.runner.writers: the JSONL and TensorBoard writers, fan-out, log formatting."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxckpt.runner import metrics_jsonl, writers


def test_jsonl_writer_appends_one_object_per_point(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with writers.JsonlWriter(path) as writer:
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
    with writers.JsonlWriter(path) as writer:
        writer.write(1, "train", {"loss": 1.0})
    with writers.JsonlWriter(path) as writer:
        writer.write(2, "train", {"loss": 0.5})
    assert [p["step"] for p in metrics_jsonl.read_metrics(path)] == [1, 2]


def test_non_finite_values_are_valid_json_and_read_back_as_nan(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with writers.JsonlWriter(path) as writer:
        writer.write(3, "train", {"loss": float("nan"), "grad_norm": float("inf")})
    line = path.read_text().strip()
    assert json.loads(line) == {"step": 3, "split": "train", "loss": None, "grad_norm": None}
    assert "NaN" not in line and "Infinity" not in line
    (point,) = metrics_jsonl.read_metrics(path)
    assert math.isnan(point["loss"]) and math.isnan(point["grad_norm"])


@pytest.mark.parametrize("bad", [{"loss": np.ones(3)}, {"step": 1.0}, {"split": 0.0}])
def test_writer_rejects_non_scalars_and_reserved_names(tmp_path, bad):
    with writers.JsonlWriter(tmp_path / "m.jsonl") as writer:
        with pytest.raises(ValueError, match=next(iter(bad))):
            writer.write(1, "train", bad)


def test_integer_counts_are_written_as_integers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with writers.JsonlWriter(path) as writer:
        writer.write(10, "val", {"loss": np.float32(0.5), "num_examples": np.int64(216), "seen": 3})
    assert path.read_text() == '{"step": 10, "split": "val", "loss": 0.5, "num_examples": 216, "seen": 3}\n'
    (point,) = metrics_jsonl.read_metrics(path)
    assert type(point["num_examples"]) is int and type(point["loss"]) is float


def test_format_metrics():
    text = writers.format_metrics({"loss": jnp.float32(0.312745), "accuracy": 0.9, "examples": np.int64(128)})
    assert text == "loss=0.3127 accuracy=0.9 examples=128"


def _event_files(logdir):
    return [p for p in logdir.rglob("*") if p.name.startswith("events.out.tfevents")]


def test_tensorboard_writer_writes_tagged_scalars(tmp_path):
    logdir = tmp_path / "tensorboard"
    with writers.TensorBoardWriter(logdir) as writer:
        writer.write(5, "val", {"accuracy": 0.5})
    (event_file,) = _event_files(logdir)
    # The tag is stored verbatim in the serialized event protos.
    assert b"val/accuracy" in event_file.read_bytes()


def test_open_writers_fans_out_to_jsonl_and_tensorboard(tmp_path):
    with writers.open_writers(tmp_path) as writer:
        assert isinstance(writer, writers.MultiWriter)
        writer.write(1, "train", {"loss": 2.0})
        writer.flush()
    assert metrics_jsonl.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "split": "train", "loss": 2.0}]
    assert _event_files(tmp_path / "tensorboard")
