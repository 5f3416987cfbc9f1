"""jaxckpt.runner.object_lock: the workdir lock on gs:// and s3:// (emulators from tests/object_store.py)."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxckpt.checkpoint import storage
from jaxckpt.errors import MissingDependencyError, WorkdirError
from jaxckpt.runner import object_lock
from jaxckpt.runner.object_lock import ObjectLock, lock_for

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(params=["gcs_emulator", "s3_emulator"])
def workdir(request):
    """A fresh workdir URL on each store, per test (not `node.name`: fsspec globs its brackets)."""
    return f"{request.getfixturevalue(request.param)}/locks/{request.node.originalname}"


def _record(workdir: str) -> dict:
    return json.loads(storage.as_path(f"{workdir}/.lock").read_bytes())


def test_acquire_refuse_release(workdir):
    first = ObjectLock(workdir).acquire()
    record = _record(workdir)
    assert record["holder"] == first.holder and record["pid"] == os.getpid()
    assert record["expires_at"] > time.time() + 50

    with pytest.raises(WorkdirError) as refused:
        ObjectLock(workdir).acquire()
    message = str(refused.value)
    assert workdir in message and first.holder in message and f"pid {os.getpid()}" in message
    assert "pass another --workdir" in message

    first.release()
    first.release()  # idempotent
    assert not storage.as_path(f"{workdir}/.lock").exists()
    with ObjectLock(workdir) as second:
        assert second.held and _record(workdir)["holder"] == second.holder
    assert not second.held and not storage.as_path(f"{workdir}/.lock").exists()


def test_a_live_holder_renews_its_lease(workdir):
    with ObjectLock(workdir, lease_s=1.5) as holder:
        first_expiry = _record(workdir)["expires_at"]
        time.sleep(3.0)  # twice the lease: only renewals keep it
        assert _record(workdir)["expires_at"] > first_expiry + 1.0
        with pytest.raises(WorkdirError, match=holder.holder):
            ObjectLock(workdir, lease_s=1.5).acquire()
        holder.check()


def test_an_expired_lease_is_taken_over_and_the_log_says_so(workdir, caplog):
    dead = {"holder": "deadbeef", "host": "gone-host", "pid": 4242, "lease_s": 1,
            "expires_at": time.time() - 5}
    storage.write_bytes_atomic(f"{workdir}/.lock", json.dumps(dead).encode())
    with caplog.at_level(logging.WARNING, logger="jaxckpt"), ObjectLock(workdir) as lock:
        assert _record(workdir)["holder"] == lock.holder
    takeover = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert len(takeover) == 1 and "deadbeef" in takeover[0] and "pid 4242 on gone-host" in takeover[0]


def test_a_holder_notices_that_its_lock_was_taken_over(workdir, caplog):
    lock = ObjectLock(workdir, lease_s=1.5).acquire()
    try:
        intruder = {"holder": "intruder", "host": "h", "pid": 1, "lease_s": 60,
                    "expires_at": time.time() + 60}
        storage.write_bytes_atomic(f"{workdir}/.lock", json.dumps(intruder).encode())
        deadline = time.monotonic() + 10
        while lock.held and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(WorkdirError, match="lost the lock.*intruder"):
            lock.check()
    finally:
        lock.release()
    assert _record(workdir)["holder"] == "intruder", "a lost lock must not delete its new holder's object"


_HOLDER = """
import sys, time
from jaxckpt.runner.object_lock import ObjectLock
lock = ObjectLock(sys.argv[1], lease_s=float(sys.argv[2])).acquire()
print(lock.holder, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_holder_is_taken_over_after_its_lease_expires(workdir, caplog):
    lease_s = 3.0
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir, str(lease_s)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        holder = child.stdout.readline().strip()
        assert holder, "the child did not take the lock"
        time.sleep(lease_s)  # it renews meanwhile
        with pytest.raises(WorkdirError, match=f"{holder}.*pid {child.pid}"):
            ObjectLock(workdir, lease_s=lease_s).acquire()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    killed_at = time.time()

    lock = ObjectLock(workdir, lease_s=lease_s)
    with caplog.at_level(logging.WARNING, logger="jaxckpt"):
        while True:  # refused until the lease the child last renewed runs out
            try:
                lock.acquire()
                break
            except WorkdirError as error:
                assert holder in str(error)
                assert time.time() - killed_at < lease_s + 5, "the lease never expired"
                time.sleep(0.2)
    try:
        assert time.time() - killed_at > lease_s / 2, "taken over before the lease could have expired"
        assert _record(workdir)["holder"] == lock.holder
        assert any("took over" in r.getMessage() and holder in r.getMessage() for r in caplog.records)
    finally:
        lock.release()


def test_lock_for_picks_the_lock_by_path(tmp_path, gcs_emulator):
    local = lock_for(tmp_path / "run")
    with local:
        local.check()
        assert (tmp_path / "run" / ".lock").exists()
        with pytest.raises(WorkdirError, match="in use by"):
            lock_for(tmp_path / "run").acquire()
    remote = lock_for(f"{gcs_emulator}/locks/lock_for", lease_s=5)
    assert isinstance(remote, ObjectLock) and remote.lease_s == 5
    assert str(remote.path) == f"{gcs_emulator}/locks/lock_for/.lock"


@pytest.mark.parametrize("module, url, extra", [
    ("boto3", "s3://bucket/run", "jaxckpt[s3]"),
    ("google.cloud.storage", "gs://bucket/run", "jaxckpt[gcs]"),
])
def test_a_missing_client_names_the_extra(monkeypatch, module, url, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingDependencyError, match=extra.replace("[", r"\[")):
        ObjectLock(url)


def test_lease_must_be_positive():
    with pytest.raises(ValueError, match="lease_s"):
        object_lock.ObjectLock("gs://bucket/run", lease_s=0)
