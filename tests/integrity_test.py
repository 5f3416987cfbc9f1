"""Tests for jaxckpt.checkpoint.integrity: only proof of damage counts as corruption."""

import errno
import json

import pytest

from jaxckpt.checkpoint import integrity
from jaxckpt.errors import CheckpointCorruptError, CheckpointReadError, ChecksumMismatch, ChunkSizeMismatch

EIO = ValueError("UNKNOWN: Error reading local file \"/r/1/state/d/ab\": pread failed: Input/output error "
                 "[os_error_code='5']")
EMFILE = ValueError("RESOURCE_EXHAUSTED: Error opening file: Too many open files [os_error_code='24']")
EACCES = ValueError("PERMISSION_DENIED: Error opening file: Permission denied [os_error_code='13']")


@pytest.mark.parametrize("exc", [
    ChecksumMismatch(["params/w"]),
    ChunkSizeMismatch("the stored chunk of params/w holds 3 bytes, expected 16"),
    ValueError("DATA_LOSS: Error reading \"params.w/0\": checksum mismatch"),
    ValueError("OUT_OF_RANGE: Read past end of file"),
    ValueError("Error decoding zstd-compressed chunk"),
    json.JSONDecodeError("/r/1/state/_METADATA does not parse: Expecting value", "{x", 1),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/1/state/d/ab"),
])
def test_proof_of_damage(tmp_path, exc):
    assert integrity.damage(RuntimeError("wrapped"), tmp_path) is None
    wrapped = RuntimeError("restore failed")
    wrapped.__cause__ = exc
    assert integrity.damage(wrapped, tmp_path) is not None


@pytest.mark.parametrize("exc, reason, retry", [
    (EIO, "EIO (Input/output error)", True),
    (EMFILE, "EMFILE (Too many open files)", True),
    (EACCES, "EACCES (Permission denied)", False),
    (OSError(errno.ENFILE, "Too many open files in system"), "ENFILE", True),
    (MemoryError(), "out of memory", True),
    (TimeoutError("read timed out"), "timed out", True),
    (ValueError("UNAVAILABLE: HTTP status 503 Service Unavailable"), "UNAVAILABLE", True),
    (AttributeError("'PyTreeCheckpointHandler' has no attribute 'x'"), "AttributeError", False),
])
def test_what_proves_nothing(tmp_path, exc, reason, retry):
    assert integrity.damage(exc, tmp_path) is None
    found, again = integrity.cause(exc)
    assert reason in found and again == retry


def test_a_missing_file_proves_nothing_once_the_step_itself_is_gone(tmp_path):
    assert integrity.damage(FileNotFoundError(errno.ENOENT, "gone"), tmp_path / "7") is None


def test_transient_failures_are_retried_then_reported_naming_step_and_cause(tmp_path):
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise EIO
        return "read"

    assert integrity.read_step(tmp_path, flaky, sleep=waits.append) == "read"
    assert len(calls) == 3 and waits == list(integrity.BACKOFF_SECONDS)

    def lasting():
        raise EMFILE

    with pytest.raises(CheckpointReadError, match=rf"of step {tmp_path.name} at {tmp_path}: EMFILE .*"
                       r"\(3 attempts\)\. Nothing was moved") as e:
        integrity.read_step(tmp_path, lasting, sleep=waits.append)
    assert e.value.step_dir == tmp_path

    def denied():
        calls.append(1)
        raise EACCES

    calls.clear()
    with pytest.raises(CheckpointReadError, match="EACCES"):
        integrity.read_step(tmp_path, denied, sleep=waits.append)
    assert len(calls) == 1  # retrying cannot change a permission


def test_damage_is_corruption_at_once(tmp_path):
    def damaged():
        raise ChecksumMismatch(["params/w"])

    with pytest.raises(CheckpointCorruptError, match=r"is corrupt: .*params/w") as e:
        integrity.read_step(tmp_path, damaged, sleep=pytest.fail)
    assert e.value.step_dir == tmp_path
