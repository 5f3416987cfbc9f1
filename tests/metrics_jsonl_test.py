"""Tests for jaxckpt.runner.metrics_jsonl: reading metrics.jsonl and truncating it on resume."""


import pytest

from jaxckpt.runner import metrics_jsonl, writers


def test_truncate_after_keeps_points_up_to_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with writers.JsonlWriter(path) as writer:
        for step in (10, 20, 30, 40):
            writer.write(step, "train", {"loss": 1.0 / step})
        writer.write(20, "val", {"loss": 0.1})
    removed = metrics_jsonl.truncate_after(path, 20)
    assert removed == 2
    assert [(p["step"], p["split"]) for p in metrics_jsonl.read_metrics(path)] == [
            (10, "train"), (20, "train"), (20, "val")]
    # No temporary files left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    # A resumed run appends after the truncation point without duplicates.
    with writers.JsonlWriter(path) as writer:
        writer.write(30, "train", {"loss": 0.03})
    assert [p["step"] for p in metrics_jsonl.read_metrics(path)] == [10, 20, 20, 30]


def test_truncate_after_keeps_the_dropped_points_where_asked(tmp_path):
    path, aside = tmp_path / "metrics.jsonl", tmp_path / "superseded" / "metrics.jsonl"
    aside.parent.mkdir()
    with writers.JsonlWriter(path) as writer:
        for step, split in ((10, "train"), (20, "train"), (20, "val"), (30, "train"), (40, "val")):
            writer.write(step, split, {"loss": 1.0 / step})
    before = path.read_text().splitlines(keepends=True)
    assert metrics_jsonl.truncate_after(path, 20, dropped_to=aside) == 2
    assert path.read_text() == "".join(before[:3])
    assert aside.read_text() == "".join(before[3:])  # byte for byte, in file order
    assert metrics_jsonl.truncate_after(path, 20, dropped_to=aside) == 0 and aside.read_text() == "".join(before[3:])


def test_truncate_after_drops_a_torn_last_line_and_tolerates_missing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert metrics_jsonl.truncate_after(path, 5) == 0
    assert not path.exists()
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
    assert [p["step"] for p in metrics_jsonl.read_metrics(path)] == [1]
    metrics_jsonl.truncate_after(path, 100)
    assert path.read_text() == '{"step": 1, "split": "train", "loss": 1.0}\n'


def test_read_metrics_names_the_corrupt_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\nnot json\n{"step": 2, "split": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        metrics_jsonl.read_metrics(path)
