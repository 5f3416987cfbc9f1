"""Chaos: fifty save/restore cycles with random faults below Python lose no committed step and
quarantine no intact one.

A child process saves step N (each step's arrays are a function of N) and restores the latest step
with a fallback, once per cycle, under the `tests.faults` shim, which it reconfigures each cycle
(EIO/EMFILE on reads, ENOSPC/EIO on writes and fsyncs, EMFILE on opens of a save in flight). Some
cycles the parent SIGKILLs it at a random point of a save, and a new child carries on in the same
directory. The schedule comes from one seed. At the end a clean process checks every committed
step is there and verifies, and that nothing was moved to corrupt/.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests import faults
from tests.runs import ROOT

pytestmark = pytest.mark.slow

SEED = 11
CYCLES = 50
READ_FAULTS = [("/state/d/", "read", "EIO", 1), ("/state/d/", "read", "EIO", -1),
               ("/state/d/", "read", "EMFILE", -1), ("/state/", "open", "EMFILE", -1)]
SAVE_FAULTS = [("orbax-checkpoint-tmp", "write", "ENOSPC", -1), ("orbax-checkpoint-tmp", "write", "EIO", -1),
               ("orbax-checkpoint-tmp", "fsync", "EIO", -1), ("orbax-checkpoint-tmp", "open", "EMFILE", 5)]

# Runs the cycles it is given (a JSON schedule), printing one JSON line per event.
CHILD = r"""
import ctypes, json, os, sys, warnings
import jax.numpy as jnp, numpy as np
import jaxckpt
from jaxckpt.checkpoint import integrity
from jaxckpt.errors import CheckpointCorruptError, CheckpointNotFoundError, CheckpointReadError, CheckpointSaveError

integrity.BACKOFF_SECONDS = (0.02, 0.05)  # the outcome matters here, not the wait (1.2 s a failed read)

directory, schedule = sys.argv[1], json.loads(sys.argv[2])
shim = ctypes.CDLL(None)
warnings.simplefilter("ignore")

def fault(spec):
    for key in ("PATH", "OP", "ERRNO", "TIMES"):
        os.environ.pop("JAXCKPT_FAULT_" + key, None)
    if spec:
        path, op, name, times = spec
        os.environ.update(JAXCKPT_FAULT_PATH=path, JAXCKPT_FAULT_OP=op, JAXCKPT_FAULT_ERRNO=name,
                          JAXCKPT_FAULT_TIMES=str(times))
    shim.jaxckpt_fault_configure()

def state(step):
    return {"params": {f"w{i}": jnp.full((64, 64), step * 10.0 + i) for i in range(8)}, "step": jnp.int32(step)}

def say(**event):
    print(json.dumps(event), flush=True)

fault(None)
manager = jaxckpt.CheckpointManager(directory, max_to_keep=-1)
say(event="open", steps=manager.all_steps())
for cycle in schedule:
    step = cycle["step"]
    fault(cycle["save_fault"])
    if cycle["kill"]:
        say(event="saving", step=step)
    try:
        manager.save(step, state(step))
        manager.wait()
        say(event="committed", step=step)
    except CheckpointSaveError as e:
        say(event="save_failed", step=step, message=str(e)[:200])
    fault(cycle["read_fault"])
    try:
        restored = manager.restore(jaxckpt.unflatten_dict({p: v for p, v in jaxckpt.flatten(state(0)).items()}),
                                   fallback=True)
        got = int(restored["step"])
        ok = all(np.array_equal(np.asarray(v), np.full((64, 64), got * 10.0 + i))
                 for i, v in enumerate(restored["params"][f"w{i}"] for i in range(8)))
        say(event="restored", step=got, values_ok=ok)
    except CheckpointReadError as e:
        say(event="read_failed", message=str(e)[:200])
    except CheckpointNotFoundError:
        say(event="no_step")
    except CheckpointCorruptError as e:
        say(event="corrupt", message=str(e)[:300])
    fault(None)
    corrupt = os.path.join(directory, "corrupt")
    say(event="cycle", step=step, quarantined=sorted(os.listdir(corrupt)) if os.path.isdir(corrupt) else [])
manager.close()
"""

CHECK = r"""
import json, os, sys
import jaxckpt
directory = sys.argv[1]
manager = jaxckpt.CheckpointManager(directory, read_only=True)
for step in manager.all_steps():
    manager.verify(step)
print(json.dumps({"steps": manager.all_steps(), "corrupt": os.path.isdir(os.path.join(directory, "corrupt")),
                  "leftovers": sorted(p for p in os.listdir(directory) if "orbax-checkpoint-tmp" in p)}))
"""


def _schedule(rng):
    cycles = []
    for i in range(CYCLES):
        kill = rng.random() < 0.08
        cycles.append({
            "step": i + 1, "kill": kill,
            "save_fault": None if kill or rng.random() < 0.5 else rng.choice(SAVE_FAULTS),
            "read_fault": None if rng.random() < 0.4 else rng.choice(READ_FAULTS),
        })
    return cycles


def test_chaos_loses_no_committed_step_and_quarantines_no_intact_one(tmp_path):
    rng = random.Random(SEED)
    schedule = _schedule(rng)
    directory = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "LD_PRELOAD": str(faults.shim()), "JAXCKPT_FAULT_LOG": str(tmp_path / "injected")}
    committed, present, counts, todo = set(), set(), {"kills": 0, "save_failed": 0, "read_failed": 0, "restored": 0,
                                      "committed": 0, "starts": 0}, list(schedule)
    started = time.monotonic()
    while todo:
        counts["starts"] += 1
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), json.dumps(todo)], cwd=ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        done_steps, killed = set(), False
        for line in child.stdout:
            event = json.loads(line)
            if event["event"] == "open":
                assert committed <= set(event["steps"]), f"committed steps lost: {committed - set(event['steps'])}"
                present = set(event["steps"])  # (a killed save may have committed before the kill)
            elif event["event"] == "saving":  # this cycle's save is killed at a random point
                time.sleep(rng.uniform(0.0, 0.15))
                child.send_signal(signal.SIGKILL)
                counts["kills"] += 1
                done_steps.add(event["step"])
                killed = True
                break
            elif event["event"] == "committed":
                committed.add(event["step"])
                present.add(event["step"])
                counts["committed"] += 1
            elif event["event"] in ("save_failed", "read_failed"):
                counts[event["event"]] += 1
            elif event["event"] == "restored":
                counts["restored"] += 1
                assert event["values_ok"], event
                assert event["step"] == max(present), (event, sorted(present))
            elif event["event"] == "corrupt":
                pytest.fail(f"an intact step was taken for corrupt: {event}")
            elif event["event"] == "cycle":
                assert event["quarantined"] == [], event
                done_steps.add(event["step"])
        child.wait(timeout=120)
        if not killed:
            assert child.returncode == 0, child.stderr.read()[-3000:]
        todo = [c for c in todo if c["step"] not in done_steps]
    check = faults.run_python(CHECK, str(directory), env={})
    assert check.returncode == 0, check.stderr[-3000:]
    final = json.loads(check.stdout.strip().splitlines()[-1])
    lost = committed - set(final["steps"])
    injected = faults.injected(tmp_path / "injected")
    by_kind = {}
    for line in injected:
        call, code = line.split()[:2]
        by_kind[f"{call} {code}"] = by_kind.get(f"{call} {code}", 0) + 1
    report = {"cycles": CYCLES, "seed": SEED, **counts, "injected_calls": len(injected), "by_call_errno": by_kind,
              "lost": sorted(lost), "quarantined": 0 if not final["corrupt"] else "some",
              "leftovers": final["leftovers"], "seconds": round(time.monotonic() - started, 1)}
    print("chaos:", json.dumps(report))
    assert not lost and not final["corrupt"]
    assert counts["kills"] >= 1 and counts["save_failed"] >= 5 and counts["read_failed"] >= 5
