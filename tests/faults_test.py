"""Real I/O errors under tensorstore, injected with the LD_PRELOAD shim of `tests.faults`.

Each case runs jaxckpt in a subprocess whose libc fails the chosen calls on a step's OCDBT data
files (`state/d/*`, where the array bytes are). Issue 11: a failed read is not proof that a
checkpoint is damaged: each becomes `CheckpointReadError` (after retries where they can help),
and no reader, not even a fallback restore, moves a step to `corrupt/`.
"""

import errno
import json
import os
import shutil

import jax.numpy as jnp
import pytest

import jaxckpt
from tests import faults

pytestmark = pytest.mark.slow  # one subprocess (a jax import, ~4 s) per case

READERS = ("read_state", "verify_state", "restore", "restore(fallback=True)")
ARRAY_FILES = "/state/d/"  # the data files of every saved step
SAVING_ARRAY_FILES = "state.orbax-checkpoint-tmp/d/"  # the same while a save writes them

# Restores the latest step in the ways named on the command line; prints what each raised, and
# what was moved to corrupt/.
RESTORE = """
import json, os, sys, warnings
import jax.numpy as jnp
import jaxckpt
from jaxckpt.checkpoint import stepdir

directory, readers = sys.argv[1], sys.argv[2:]
target = {"params": {"w": jnp.zeros((8, 8)), "b": jnp.zeros(8)}, "step": jnp.int32(0)}

def outcome(call):
    try:
        call()
        return None
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e), "cause": str(e.__cause__)}

manager = jaxckpt.CheckpointManager(directory)
step_dir = manager.step_dir(manager.latest_step())
calls = {
    "read_state": lambda: stepdir.read_state(step_dir, target),
    "verify_state": lambda: stepdir.verify_state(step_dir),
    "restore": lambda: manager.restore(target),
    "restore(fallback=True)": lambda: manager.restore(target, fallback=True),
}
warnings.simplefilter("ignore")  # the fallback's warning repeats its error
result = {reader: outcome(calls[reader]) for reader in readers}
corrupt = os.path.join(directory, "corrupt")
result["quarantined"] = sorted(os.listdir(corrupt)) if os.path.isdir(corrupt) else []
print(json.dumps(result))
"""

# Saves step 3 with background saves (the default); prints what the save raised.
SAVE = """
import json, sys
import jax.numpy as jnp
import jaxckpt

result = None
try:
    with jaxckpt.CheckpointManager(sys.argv[1]) as manager:
        manager.save(3, {"params": {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}, "step": jnp.int32(3)})
except Exception as e:
    result = {"type": type(e).__name__, "message": str(e), "cause": str(e.__cause__)}
print(json.dumps(result))
"""

def _tree(step):
    return {"params": {"w": jnp.arange(64.0).reshape(8, 8) + step, "b": jnp.ones(8)}, "step": jnp.int32(step)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "checkpoints"
    with jaxckpt.CheckpointManager(directory, async_save=False) as manager:
        for step in (1, 2):
            manager.save(step, _tree(step))
    return directory


@pytest.fixture
def checkpoints(saved, tmp_path):
    """A fresh copy of two saved steps (a fallback restore may move them)."""
    return shutil.copytree(saved, tmp_path / "checkpoints")


def _run(code, fault_env, *args):
    done = faults.run_python(code, *map(str, args), env=fault_env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _restore(directory, fault_env, readers=READERS):
    return _run(RESTORE, fault_env, directory, *readers)


@pytest.mark.parametrize("name", ["EIO", "EMFILE", "ENFILE", "ENOMEM", "EACCES"])
def test_a_read_error_surfaces_from_every_reader_with_its_errno(checkpoints, tmp_path, name):
    log = tmp_path / "injected"
    result = _restore(checkpoints, faults.env(ARRAY_FILES, op="read", errno=name, log=log))
    code = getattr(errno, name)
    assert faults.injected(log)[0].split()[:2] == ["pread", str(code)]  # tensorstore's own pread failed
    for reader in READERS:
        error = result[reader]
        assert error is not None, f"{reader} succeeded although every read of the array files failed"
        # Tensorstore names the errno in every message: what the classification relies on.
        assert f"os_error_code='{code}'" in error["cause"], error
        # One error naming the step and the cause, which proves nothing about the bytes.
        assert error["type"] == "CheckpointReadError", error
        assert f"{name} ({os.strerror(code)})" in error["message"] and f"{checkpoints}/2" in error["message"], error
        assert "Nothing was moved" in error["message"]
    assert result["quarantined"] == [] and sorted(os.listdir(checkpoints)) == ["1", "2"]


def test_eagain_on_a_read_is_retried_by_tensorstore(checkpoints, tmp_path):
    # (Forever EAGAIN makes tensorstore retry forever, spinning a core: not tested.)
    log = tmp_path / "injected"
    result = _restore(checkpoints, faults.env(ARRAY_FILES, op="read", errno="EAGAIN", times=3, log=log))
    assert len(faults.injected(log)) == 3
    assert all(result[reader] is None for reader in READERS), result


@pytest.mark.parametrize("name, times", [("EIO", 1), ("EMFILE", -1), ("ENOMEM", -1), ("EACCES", -1)])
def test_a_read_error_quarantines_nothing(checkpoints, name, times):
    # times=1: one failed read, which a second attempt would not meet; today the latest step is
    # moved aside for it. -1: a lasting error, which today moves every step aside.
    fault_env = faults.env(ARRAY_FILES, op="read", errno=name, times=times)
    result = _restore(checkpoints, fault_env, ["restore(fallback=True)"])
    assert result["quarantined"] == [] and sorted(os.listdir(checkpoints)) == ["1", "2"]
    error = result["restore(fallback=True)"]
    assert error is None or error["type"] != "CheckpointCorruptError", error


@pytest.mark.parametrize("op, name", [("write", "ENOSPC"), ("write", "EIO"), ("fsync", "EIO")])
def test_a_failed_write_fails_the_save_and_keeps_earlier_steps(checkpoints, tmp_path, op, name):
    log = tmp_path / "injected"
    result = _run(SAVE, faults.env(SAVING_ARRAY_FILES, op=op, errno=name, log=log), checkpoints)
    assert faults.injected(log), "the shim never fired: tensorstore wrote through another call"
    assert result is not None and result["type"] == "CheckpointSaveError", result
    assert f"os_error_code='{getattr(errno, name)}'" in result["cause"]
    if name == "ENOSPC":
        assert "the disk is full" in result["message"]
    assert "Earlier checkpoints [1, 2]" in result["message"]
    assert sorted(os.listdir(checkpoints)) == ["1", "2"]  # no step 3, no partial directory
    manager = jaxckpt.CheckpointManager(checkpoints, read_only=True)
    for step in (1, 2):
        manager.verify(step)


def test_the_shim_leaves_other_paths_alone(checkpoints, tmp_path):
    log = tmp_path / "injected"
    result = _restore(checkpoints, faults.env("/no/such/path/", op="open,read,write,fsync", log=log))
    assert not faults.injected(log)
    assert all(result[reader] is None for reader in READERS), result
