"""The run files of a gs:// or s3:// workdir: train.log, TensorBoard events, metrics, JSON, predictions.

The emulators come from tests/object_store.py (registered in conftest.py).
"""

import json
import logging
import struct
import time

import numpy as np
import pytest

from jaxckpt.checkpoint import storage
from jaxckpt.errors import WorkdirError
from jaxckpt.runner import logs, loop, object_lock, predictions
from jaxckpt.runner.curves import plot_curves
from jaxckpt.runner.follow_results import FollowerResults
from jaxckpt.runner.lock import holding, holds_lock, run_lock
from jaxckpt.runner.metrics_jsonl import append_point, read_metrics, truncate_after
from jaxckpt.runner.rundir import entries, remove_bookkeeping, set_aside, write_json
from jaxckpt.runner.writers import TensorBoardWriter, open_writers


@pytest.fixture(params=["gcs_emulator", "s3_emulator"])
def workdir(request):
    """A fresh workdir URL on each store, per test (not `node.name`: fsspec globs its brackets)."""
    return f"{request.getfixturevalue(request.param)}/runs/{request.node.originalname}"


def _read(url: str) -> bytes:
    return storage.as_path(url).read_bytes()


@pytest.fixture
def test_log():
    """A logger of its own, so the test's records reach only the handler under test."""
    logger = logging.getLogger("jaxckpt.remote_test")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def test_train_log_is_uploaded_at_close_and_at_once_for_a_warning(workdir, test_log):
    url = f"{workdir}/train.log"
    handler = logs.file_handler(url)
    assert isinstance(handler, logs.UploadingHandler)
    handler.every_s = 3600.0  # only a warning or close uploads
    test_log.addHandler(handler)
    test_log.info("step 1 train loss=0.5")
    assert not storage.as_path(url).exists()
    test_log.warning("could not renew the lease")
    text = _read(url).decode()
    assert "INFO step 1 train loss=0.5" in text and "WARNING could not renew the lease" in text
    test_log.info("done at step 2")
    assert "done at step 2" not in _read(url).decode()
    test_log.removeHandler(handler)
    handler.close()
    handler.close()  # idempotent
    assert _read(url).decode().splitlines()[-1].endswith("INFO done at step 2")

    # A rerun in the same workdir appends to the log, as a local train.log does.
    again = logs.file_handler(url)
    test_log.addHandler(again)
    test_log.info("resumed")
    again.close()
    lines = _read(url).decode().splitlines()
    assert len(lines) == 4 and lines[-1].endswith("INFO resumed")


def test_train_log_records_go_up_within_the_interval_without_more_records(workdir, test_log):
    url = f"{workdir}/train.log"
    handler = logs.UploadingHandler(url, every_s=0.5)
    test_log.addHandler(handler)
    handler._uploaded_at = time.monotonic()  # the next record is not due yet: the timer must send it
    test_log.info("only record")
    deadline = time.monotonic() + 20
    while not (storage.as_path(url).exists() and b"only record" in _read(url)):
        assert time.monotonic() < deadline, "the pending record was never uploaded"
        time.sleep(0.2)


def _events(data: bytes) -> list:
    """The events of a TFRecord event file (length, crc, payload, crc per record)."""
    from tensorboardX.proto import event_pb2

    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        payload = data[offset + 12: offset + 12 + length]
        out.append(event_pb2.Event.FromString(payload))
        offset += 12 + length + 4
    return out


def test_tensorboard_events_are_staged_and_uploaded(workdir):
    logdir = f"{workdir}/tensorboard"
    writer = TensorBoardWriter(logdir)
    writer.write(1, "train", {"loss": 0.5})
    writer.flush()
    (name,) = [p.name for p in storage.as_path(logdir).iterdir()]
    assert name.startswith("events.out.tfevents")
    writer.write(2, "val", {"accuracy": 0.75})
    writer.close()
    staging = writer._staging
    assert staging is None
    scalars = {(e.step, v.tag): v.simple_value for e in _events(_read(f"{logdir}/{name}")) for v in e.summary.value}
    assert scalars == {(1, "train/loss"): 0.5, (2, "val/accuracy"): 0.75}

    # A resumed run writes a second event file next to the first, starting with its purge step.
    time.sleep(1.1)  # event file names hold the time in seconds
    resumed = TensorBoardWriter(logdir, purge_step=2)
    resumed.write(2, "val", {"accuracy": 0.8})
    resumed.close()
    names = sorted(p.name for p in storage.as_path(logdir).iterdir())
    assert len(names) == 2
    events = _events(_read(f"{logdir}/{names[1]}"))
    assert any(e.HasField("session_log") and e.step == 2 for e in events)


def test_metrics_jsonl_curves_and_truncation(workdir):
    with open_writers(workdir, tensorboard=False) as writer:
        writer.write(1, "train", {"loss": 1.0})
        writer.write(2, "train", {"loss": 0.5, "accuracy": np.float32(0.6)})
        writer.write(2, "val", {"loss": float("nan"), "accuracy": 0.7})
    points = read_metrics(f"{workdir}/metrics.jsonl")
    assert [(p["step"], p["split"]) for p in points] == [(1, "train"), (2, "train"), (2, "val")]
    assert np.isnan(points[2]["loss"]) and points[2]["accuracy"] == 0.7
    append_point(f"{workdir}/metrics.jsonl", 3, "val", {"accuracy": 0.9})
    assert read_metrics(f"{workdir}/metrics.jsonl")[-1] == {"step": 3, "split": "val", "accuracy": 0.9}

    out = plot_curves(f"{workdir}/metrics.jsonl", f"{workdir}/curves.png", main_metric="accuracy")
    assert str(out) == f"{workdir}/curves.png" and _read(str(out)).startswith(b"\x89PNG")

    dropped = f"{workdir}/superseded/x/metrics.jsonl"
    assert truncate_after(f"{workdir}/metrics.jsonl", 1, dropped_to=dropped) == 3
    assert [p["step"] for p in read_metrics(f"{workdir}/metrics.jsonl")] == [1]
    assert [p["step"] for p in read_metrics(dropped)] == [2, 2, 3]
    assert truncate_after(f"{workdir}/absent.jsonl", 1) == 0
    assert read_metrics(f"{workdir}/absent.jsonl") == []


def test_json_files_are_the_same_bytes_as_locally(workdir, tmp_path):
    config = {"train": {"num_steps": 3, "batch_size": 8}, "task": "digits", "tuple": (1, 2)}
    write_json(f"{workdir}/config.json", config)
    write_json(tmp_path / "config.json", config)
    assert _read(f"{workdir}/config.json") == (tmp_path / "config.json").read_bytes()
    write_json(f"{workdir}/eval_val_3.json", {"step": 3, "split": "val", "accuracy": 0.5, "loss": None})
    results = FollowerResults(workdir, "val")
    assert results.metrics(3) == {"val/accuracy": 0.5, "val/loss": pytest.approx(float("nan"), nan_ok=True)}
    assert results.metrics(4) is None


class _Classifier:
    class_names = ("cat", "dog")


def test_predictions_written_to_a_url_match_the_local_file(workdir, tmp_path):
    outputs = np.asarray([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    for where in (storage.run_path(workdir), tmp_path):
        writer = predictions.Writer(where, _Classifier())
        writer.add(np.asarray([10, 11]), outputs, np.asarray([0, 1]))
        path = writer.close()
    assert _read(f"{workdir}/predictions.csv") == (tmp_path / "predictions.csv").read_bytes()
    assert _read(f"{workdir}/predictions.csv").startswith(b"id,prediction,prob_cat,prob_dog\r\n10,cat,")

    # Non-scalar columns give predictions.jsonl, and the stale CSV goes.
    writer = predictions.Writer(storage.run_path(workdir), object())
    writer.add(np.asarray([10]), {"tokens": np.asarray([[1, 2, 3]])}, np.asarray([0]))
    path = writer.close()
    assert str(path) == f"{workdir}/predictions.jsonl"
    assert json.loads(_read(str(path))) == {"id": 10, "tokens": [1, 2, 3]}
    assert sorted(entries(workdir)) == ["predictions.jsonl"]


def test_rundir_bookkeeping_on_a_url(workdir):
    assert entries(workdir) is None
    storage.write_bytes_atomic(f"{workdir}/train.log", b"x\n")
    assert entries(workdir) == {"train.log"}
    assert remove_bookkeeping(workdir, None)
    assert entries(workdir) is None

    write_json(f"{workdir}/config.json", {})
    before = entries(workdir)
    storage.write_bytes_atomic(f"{workdir}/train.log", b"x\n")
    storage.write_bytes_atomic(f"{workdir}/checkpoints/4/state/data", b"arrays")
    assert not remove_bookkeeping(workdir, before)  # a checkpoint is worth keeping
    assert entries(workdir) == {"config.json", "train.log", "checkpoints"}


def test_set_aside_copies_then_deletes_steps(workdir):
    checkpoints = storage.as_path(f"{workdir}/checkpoints")
    storage.write_bytes_atomic(checkpoints / "5" / "state" / "data", b"five")
    storage.write_bytes_atomic(checkpoints / "5" / "commit_success.txt", b"ok")
    storage.write_bytes_atomic(checkpoints / "6" / "commit_success.txt", b"ok")
    dest = set_aside(checkpoints, [5], storage.as_path(workdir))
    assert str(dest).startswith(f"{workdir}/superseded/")
    assert _read(str(dest / "5" / "state" / "data")) == b"five"
    assert (dest / "5" / "commit_success.txt").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["6"]


def test_a_lost_object_lock_stops_the_save(workdir):
    lock = object_lock.lock_for(workdir, lease_s=0.6).acquire()
    try:
        with holding(workdir, lock):
            assert run_lock(workdir + "/") is lock and holds_lock(workdir)
            loop._check_lock(storage.run_path(workdir))  # held: no error
            storage.as_path(f"{workdir}/.lock").unlink()  # as if another run had taken it over
            deadline = time.monotonic() + 20
            while lock.held:
                assert time.monotonic() < deadline, "the renewal never noticed the lock was gone"
                time.sleep(0.1)
            with pytest.raises(WorkdirError, match="lost the lock"):
                loop._check_lock(storage.run_path(workdir))
        assert run_lock(workdir) is None and not holds_lock(workdir)
    finally:
        lock.release()


def test_setup_logging_writes_the_log_to_a_url(workdir):
    old = (logs.log.level, logs.log.propagate, list(logs.log.handlers), logging.getLogger().level)
    logger = logs.setup_logging(workdir, filename="follow.log")
    try:
        logger.warning("follower started")
        assert b"WARNING follower started" in _read(f"{workdir}/follow.log")
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        logs.log.setLevel(old[0])
        logs.log.propagate = old[1]
        for handler in old[2]:
            logs.log.addHandler(handler)
        logging.getLogger().setLevel(old[3])


def test_a_run_on_a_url_writes_every_run_file_there_and_resumes(workdir, data_dir):
    import jaxckpt
    from tests.runs import tiny_config

    first = jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 20, "checkpoint.every_steps": 10}), workdir)
    assert int(first.step) == 20
    saved = sorted(p.name for p in storage.as_path(f"{workdir}/checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["10", "20"]
    state = jaxckpt.run(tiny_config(data_dir), workdir)  # the same run, now to 40 steps
    assert int(state.step) == 40
    assert {"config.json", "checkpoints", "metrics.jsonl", "curves.png", "tensorboard", "train.log"} <= entries(workdir)
    assert ".lock" not in entries(workdir)  # released
    log = _read(f"{workdir}/train.log").decode()
    assert "fresh start from random initialisation" in log
    assert "resuming from this workdir's latest checkpoint, step 20" in log
    steps = [(p["step"], p["split"]) for p in read_metrics(f"{workdir}/metrics.jsonl")]
    assert steps == [(10, "train"), (20, "train"), (20, "val"), (30, "train"), (40, "train"), (40, "val")]
    assert json.loads(_read(f"{workdir}/config.json"))["train"]["num_steps"] == 40
    assert _read(f"{workdir}/curves.png").startswith(b"\x89PNG")
    assert len(list(storage.as_path(f"{workdir}/tensorboard").iterdir())) == 2  # one event file per run
    # (run_type=val/test/predict on a URL waits on jaxckpt.weights, whose zoo.resolve takes local paths only.)
