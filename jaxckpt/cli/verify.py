"""`python -m jaxckpt verify PATH`, and the integrity line of `inspect`: is a step whole?

Reading every array of a step and comparing it with the checksum recorded when it was saved is
the only way to know: a truncated data file leaves the metadata (what `inspect` shows) intact.
"""

from __future__ import annotations

import argparse
import os
import typing

from jaxckpt.errors import CheckpointCorruptError, UserError

if typing.TYPE_CHECKING:
    from jaxckpt.checkpoint.storage import AnyPath

CORRUPT_EXIT_CODE = 1
"""Exit code of `verify` (and `inspect`) when a step is proven corrupt."""


def integrity(step_dir: AnyPath | os.PathLike) -> tuple[bool, str]:
    """`(intact, one line)` for one step: its format, checksum algorithm and what reading it found.

    Raises:
      CheckpointReadError: if the step cannot be read for a reason that proves nothing (EIO, ...).
      CheckpointFormatError: if a newer jaxckpt wrote it.
    """
    from jaxckpt.checkpoint import formats, state_item, state_read, stepdir

    number, version = formats.step_format(step_dir)
    custom = state_read.read_custom_metadata(step_dir / stepdir.STATE_ITEM)
    algorithm = (custom.get(state_item.CUSTOM_KEY) or {}).get("checksum")
    checked = state_read.checkable(custom)
    try:
        stepdir.verify_state(step_dir)
    except CheckpointCorruptError as e:
        return False, f"CORRUPT: {e}"
    origin = f"format {number}, jaxckpt {version}"
    if checked:
        return True, f"ok: {len(checked)} arrays read, each matches its {algorithm} checksum ({origin})"
    why = f"its checksums are {algorithm}, which this release does not check" if algorithm else "no checksums were recorded"
    return True, f"readable: every array read, but {why} ({origin})"


def run_verify(args: argparse.Namespace) -> int:
    """Verifies every step of PATH (or the one it names, or --step); 1 if any is corrupt."""
    from jaxckpt.weights import zoo
    from jaxckpt.weights.pretrained import is_committed, resolve_checkpoint_path

    checkpoint_dir, named = resolve_checkpoint_path(zoo.resolve(args.path))
    folders = [p for p in checkpoint_dir.iterdir() if p.name.isdigit() and p.is_dir()]
    # On gs:// / s3:// a step is written in place; one without its commit marker is no checkpoint yet.
    uncommitted = sorted(int(p.name) for p in folders if not is_committed(p))
    if uncommitted:
        print(f"not committed, not checked (a save still running, or killed): steps {uncommitted}", flush=True)
    steps = sorted(int(p.name) for p in folders if int(p.name) not in uncommitted)
    if named is not None or args.step is not None:
        wanted = args.step if args.step is not None else named
        if wanted not in steps:
            raise UserError(f"Step {wanted} is not in {checkpoint_dir}; saved steps: {steps}.")
        steps = [wanted]
    if not steps:
        raise UserError(f"{checkpoint_dir} holds no saved step; nothing to verify.")
    bad = []
    for step in steps:
        intact, line = integrity(checkpoint_dir / str(step))
        print(f"step {step}: {line}", flush=True)
        if not intact:
            bad.append(step)
    if bad:
        print(f"{len(bad)} of {len(steps)} step(s) in {checkpoint_dir} are corrupt: {bad}. Restore from an intact "
              "step (a fallback restore moves corrupt ones to corrupt/).")
        return CORRUPT_EXIT_CODE
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser(
        "verify", help="read every array of every step and check it against its saved checksum",
        description="Exit codes: 0 every step intact; 1 a step is corrupt (the bad arrays are named); "
        "2 a bad path or a step that cannot be read now (e.g. EIO), which proves nothing.")
    verify.add_argument("path", help="run dir, checkpoints dir, step dir (local, gs:// or s3://), or zoo:NAME")
    verify.add_argument("--step", type=int, default=None, help="verify only this step")
    verify.set_defaults(run=run_verify)
