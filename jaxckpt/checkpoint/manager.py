"""`CheckpointManager`: Orbax checkpoints with one retention policy, integrity checks and clear errors.

Each saved step is one directory, readable by plain Orbax:

    DIRECTORY/
      <step>/
        state/              Orbax PyTree item: the state as nested dicts
                            ({"step", "params", "opt_state", "rng", ...}; params at state["params"]);
                            its _METADATA also records an XXH3 hash of every array (integrity check).
                            Written by `jaxckpt.state_item` in one transaction where it can.
        extra/metadata      JSON item: the caller's `extra` (config, data-iterator position, ...)
        jaxckpt/metadata    JSON item: versions and save time
        metrics/metrics     Orbax's JSON metrics item (what the best-k rule ranks by)
        _CHECKPOINT_METADATA
      corrupt/<step>/       steps found corrupt, moved aside by a fallback restore (never deleted)

Reading a step with plain Orbax, without jaxckpt, on any number of devices:

    import jax, numpy as np, orbax.checkpoint as ocp
    path = "WORKDIR/checkpoints/100/state"
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    params = state["params"]

One process writes a directory through one `CheckpointManager` at a time. Opening one removes the
leftovers of a save that was killed mid-way only when no other writer of the directory may be
alive (`jaxckpt.checkpoint.writers`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
import weakref
from typing import Any, Mapping

import flax.serialization
import jax
import orbax.checkpoint as ocp

from jaxckpt.checkpoint import formats, orbax_s3, pins, state_item, step_save, storage, writers
from jaxckpt.checkpoint.retention import RetentionPolicy
from jaxckpt.checkpoint.step_metrics import LateMetrics, StepMetrics
from jaxckpt.checkpoint.stepdir import (
    CORRUPT_DIR,
    EXTRA_ITEM,
    INFO_ITEM,
    move_aside,
    read_json_item,
    read_state,
    read_state_metadata,
    saved_checksums,
    verify_state,
)
from jaxckpt.errors import CheckpointCorruptError, CheckpointNotFoundError, CheckpointSaveError
from jaxckpt.types import PyTree

log = logging.getLogger("jaxckpt")

class CheckpointManager:
    """Saves and restores train states under one directory, keeping the right checkpoints.

    Retention: the latest `max_to_keep` steps, plus the best `keep_best` by `metrics[best_metric]`,
    plus every `keep_every_steps`-th step (see `jaxckpt.checkpoint.retention.RetentionPolicy`). The best is
    recomputed from the metrics saved on disk, so it survives a restart.

    Late metrics (`late_metrics=`, e.g. a follower evaluator's results) rank the steps saved
    without the best metric, exactly as if they had been saved with it. While `waiting()` says
    more are coming, a step still lacking its metric is kept, so it can be ranked once it has one;
    steps pinned by a reader in another process (`jaxckpt.checkpoint.pins`) are never deleted.

    Example:
      >>> mngr = CheckpointManager(workdir / "checkpoints", best_metric="val_loss")
      >>> mngr.save(100, state, metrics={"val_loss": 0.3}, extra={"config": cfg})
      >>> state = mngr.restore(abstract_state, step="best")
      >>> mngr.close()
    """

    def __init__(
        self,
        directory: os.PathLike | str,
        *,
        max_to_keep: int | None = 3,
        keep_best: int = 1,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_every_steps: int | None = None,
        async_save: bool = True,
        read_only: bool = False,
        late_metrics: LateMetrics | None = None,
    ):
        """Opens (and creates) a checkpoint directory; leftovers of a killed save are removed.

        Args:
          directory: where step directories live, e.g. `WORKDIR/checkpoints`.
          max_to_keep: keep this many of the latest steps; -1 or None keeps all.
          keep_best: also keep this many of the best steps by `best_metric`.
          best_metric: the metric name that ranks steps; None: no best rule, no `step="best"`.
          best_mode: "min" (lower is better) or "max".
          keep_every_steps: also keep every step divisible by this.
          async_save: write in the background; `save` returns once arrays are copied to the host.
          read_only: only read (e.g. another run's checkpoints): nothing is created, cleaned,
            saved, deleted or moved, and the directory must exist.
          late_metrics: metrics arriving after a save (see the class docstring); saved metrics win
            where both name the same metric.

        Raises:
          ValueError: for an inconsistent retention setting (e.g. `max_to_keep=0`).
          CheckpointNotFoundError: if `read_only` and the directory does not exist.
        """
        self._directory = storage.run_path(directory)
        self._async = async_save
        self._read_only = read_only
        if read_only and not self._directory.is_dir():
            raise CheckpointNotFoundError(
                f"Checkpoint directory {self._directory} does not exist; expected a directory holding "
                "<step>/ folders (e.g. WORKDIR/checkpoints)."
            )
        if read_only and best_metric is None:  # the rule the steps were ranked by, recorded since format 2
            best_metric, best_mode = formats.recorded_best(self._directory, best_mode)
        self._policy = RetentionPolicy(max_to_keep, keep_best, best_metric, best_mode, keep_every_steps)
        self._unregister = None
        self._s3 = contextlib.ExitStack()  # Orbax 0.12.8 needs it on s3://, until close() (background saves)
        self._s3.enter_context(orbax_s3.for_path(self._directory))
        if not read_only and jax.process_index() == 0:
            self._directory.mkdir(parents=True, exist_ok=True)
            writers.remove_unfinished_saves(self._directory)
            # Dropped by close(), or when the manager is collected or the interpreter exits.
            self._unregister = weakref.finalize(self, writers.unregister, writers.register(self._directory))
        self._pending: int | None = None
        # The fast writer (`state_item.write`) unless it is off (an untested Orbax, JAXCKPT_FAST_WRITER=0):
        # then Orbax's own handler writes the same files.
        off = state_item.fast_writer_off()
        self._fast = off is None
        if off is not None and not read_only:
            log.info("saving through Orbax's PyTree handler (the same files, slower for many small leaves): %s", off)
        self._slow_noted = False
        # One process: an async save is a host snapshot, then Orbax's synchronous save on our own
        # thread (Orbax's async path blocked ~40 ms per save here, starting nine threads); several
        # processes, or Orbax's handler: Orbax's async path.
        self._own_thread = async_save and jax.process_count() == 1 and self._fast
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._metrics = StepMetrics(self._directory, self._policy, late_metrics)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=self._metrics.preservation_policy(),
            # A best_fn makes Orbax write each step's metrics item; ranking itself is the policy's.
            best_fn=lambda metrics: 0.0,
            best_mode=best_mode,
            cleanup_tmp_directories=False,  # done by writers.remove_unfinished_saves, before Orbax looks
            enable_async_checkpointing=async_save and not self._own_thread,
            create=not read_only,
            read_only=read_only,
            # gs:// and s3://: commit_success.txt commits a step (no rename); readers need it too.
            atomicity_options=storage.atomicity_options(self._directory),
        )
        self._mngr = ocp.CheckpointManager(self._directory, options=options,
                                           item_handlers=step_save.item_handlers(self._fast))

    @property
    def directory(self) -> storage.AnyPath:
        """The directory holding the step directories."""
        return self._directory

    @property
    def read_only(self) -> bool:
        """Whether this manager only reads (it then saves, deletes and moves nothing)."""
        return self._read_only

    @property
    def policy(self) -> RetentionPolicy:
        """The retention policy in force."""
        return self._policy

    def step_dir(self, step: int) -> storage.AnyPath:
        """The directory of one step (whether or not it exists)."""
        return self._directory / str(int(step))

    # Saving.

    def save(self, step: int, state: PyTree, *, metrics: Mapping[str, Any] | None = None,
             extra: Mapping[str, Any] | None = None) -> None:
        """Saves `state` as step `step`, with metrics for retention and JSON extras.

        Waits for the previous background save first, so its failure is raised here.

        Args:
          step: the step number (a new one: steps are never overwritten).
          state: a pytree (e.g. a `TrainState`); its pytree fields are saved as nested dicts.
          metrics: scalar metrics of this state, e.g. `{"val_loss": 0.3}`; ranks the best-k rule.
          extra: JSON-serialisable dict saved beside the state (config, data-iterator position, ...).

        Raises:
          ValueError: if `step` is already saved in the directory.
          TypeError: if `extra` is not JSON-serialisable or a metric is not a scalar.
          CheckpointSaveError: if this save, or the previous background one, failed.
        """
        step = int(step)
        if self._read_only:
            raise ValueError(f"This CheckpointManager for {self._directory} is read-only; open it with read_only=False to save.")
        self.wait()
        if step in self._mngr.all_steps():
            raise ValueError(
                f"Step {step} is already saved at {self.step_dir(step)}; checkpoints are never "
                "overwritten. Save under a new step number, or move that directory away first."
            )
        tree = flax.serialization.to_state_dict(state)
        metrics = step_save.metrics_ready(metrics)
        slow = state_item.unwritable(tree) if self._fast else "the fast writer is off"
        background = self._own_thread and slow is None
        if self._own_thread and slow is not None and not self._slow_noted:
            self._slow_noted = True
            log.warning("async_save=True, but this state is saved synchronously on the calling thread: %s", slow)
        info = step_save.info_record("fast" if slow is None else "orbax", self._policy)
        if background:
            tree = state_item.snapshot(tree)  # the only copy; the caller may donate `state` next
        args = step_save.step_args(tree, extra, info)
        self._pending = step
        self._metrics.record(step, metrics)
        if background:
            self._thread = threading.Thread(target=self._save_on_thread, args=(step, args, metrics),
                                            name=f"jaxckpt-save-{step}")
            self._thread.start()
            return
        try:
            self._mngr.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:
            self._pending = None
            raise self._save_failed(step, e) from e
        if not self._async or self._own_thread:  # (a tree state_item cannot snapshot is saved now)
            self.wait()

    def _save_on_thread(self, step: int, args: Any, metrics: dict[str, float]) -> None:
        try:
            self._mngr.save(step, args=args, metrics=metrics, force=True)
        except BaseException as e:  # raised to the caller by `wait`
            self._thread_error = e

    def wait(self) -> None:
        """Blocks until the background save (if any) is committed and old steps are deleted.

        Raises:
          CheckpointSaveError: if the background save failed; its partial directory is removed.
        """
        step, self._pending = self._pending, None
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._thread_error = self._thread_error, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            error = error or e
        if error is not None:
            raise self._save_failed(step, error) from error

    def _save_failed(self, step: int | None, exc: BaseException) -> CheckpointSaveError:
        """Cleans up after a failed save and builds the error to raise."""
        if step is not None:
            step_save.remove_failed_save(self._directory, step)
            self._metrics.forget(step)
        self._mngr.reload()
        return step_save.save_error(self._directory, step, self._mngr.all_steps(), exc)

    # Finding steps.

    def reload(self) -> None:
        """Re-reads the directory, after step directories were moved or removed by hand."""
        self.wait()
        self._metrics.forget()
        self._mngr.reload()

    def all_steps(self) -> list[int]:
        """Saved steps, oldest first (waits for a save in flight, then counts it)."""
        self.wait()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The most recent saved step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best step by `metrics[best_metric]` among saved steps; None if no step has a finite one."""
        ranked = self._policy.ranked_best(self._metrics_by_step())
        return ranked[0] if ranked else None

    def metrics(self, step: int | str = "latest") -> dict[str, float]:
        """The metrics saved with a step ({} if it was saved without), without loading arrays."""
        step = self._resolve_step(step)
        return dict(self._metrics_by_step().get(step) or {})

    def restore_extra(self, step: int | str = "latest") -> dict[str, Any]:
        """The `extra` dict saved with a step ({} if none), without loading arrays."""
        step = self._resolve_step(step)
        return read_json_item(self.step_dir(step), EXTRA_ITEM) or {}

    def info(self, step: int | str = "latest") -> dict[str, Any]:
        """The library's record for a step: versions and save time."""
        step = self._resolve_step(step)
        return read_json_item(self.step_dir(step), INFO_ITEM) or {}

    def checksums(self, step: int | str = "latest") -> dict[str, list]:
        """`{path: [xxh3_64, dtype, shape]}` of every array, as recorded when the step was saved."""
        return saved_checksums(self.step_dir(self._resolve_step(step)))

    def metadata(self, step: int | str = "latest") -> dict[str, jax.ShapeDtypeStruct]:
        """Paths, shapes and dtypes of a step's state without loading arrays.

        Returns:
          `{"params/dense/kernel": jax.ShapeDtypeStruct(...), "step": ..., ...}`.
        """
        step = self._resolve_step(step)
        return read_state_metadata(self.step_dir(step))

    def _metrics_by_step(self) -> dict[int, dict[str, Any] | None]:
        self.wait()
        return self._metrics.by_step(self._mngr.all_steps())

    def apply_retention(self) -> list[int]:
        """Deletes the steps retention no longer keeps, without saving (e.g. once late metrics arrived).

        Orbax applies retention only when it saves; a follower evaluator's last results arrive after
        the trainer's last save, so the follower calls this once the run has finished.

        Returns:
          The deleted steps.
        """
        if self._read_only:
            raise ValueError(f"This CheckpointManager for {self._directory} is read-only; it deletes nothing.")
        self.wait()
        saved = {step: self._metrics.saved(step) for step in self._metrics_by_step()}
        keep = self._metrics.steps_to_keep(saved)
        deleted = [step for step in self.all_steps() if step not in keep]
        for step in deleted:
            self._mngr.delete(step)
            self._metrics.forget(step)
        pins.forget_deleted(self._directory, self.all_steps())
        return deleted

    def _resolve_step(self, step: int | str) -> int:
        """Turns "latest" / "best" / an int into a saved step, or says why there is none."""
        aside = self._directory / CORRUPT_DIR
        note = f" (corrupt steps were moved to {aside})" if aside.exists() else ""
        return self._policy.pick(step, self.all_steps(), self._metrics_by_step, str(self._directory), note)

    # Restoring.

    def restore(
        self,
        target: PyTree,
        step: int | str = "latest",
        *,
        fallback: bool = False,
        verify: bool = True,
    ) -> PyTree:
        """Restores a saved state shaped like `target`, onto the target's shardings.

        Args:
          target: a tree like the saved state (e.g. `jax.eval_shape` of the state builder); leaves
            are arrays or `jax.ShapeDtypeStruct`s whose `.sharding` says where each array goes, so
            a state saved on one device topology loads onto another.
          step: "latest", "best" or a step number.
          fallback: for "latest"/"best", if the step is corrupt, warn, move it to
            `DIRECTORY/corrupt/<step>` and try the next one.
          verify: compare the restored arrays with the checksums recorded at save time.

        Returns:
          The restored tree, with the structure (and static fields) of `target`.

        Raises:
          CheckpointNotFoundError: if there is no such step (the message lists the saved ones).
          CheckpointCorruptError: if the step is unreadable or fails its checksums (and no fallback).
          ValueError: if the target's paths or shapes differ from the saved ones.
        """
        first = self._resolve_step(step)
        if not fallback or not isinstance(step, str):
            return self._restore_step(target, first, verify)
        candidates = self.candidates(step)
        errors = []
        for candidate in candidates[candidates.index(first) :]:
            try:
                return self._restore_step(target, candidate, verify)
            except CheckpointCorruptError as e:
                errors.append(str(e))
                moved = "" if self._read_only else f" Moved it to {self.quarantine(candidate)}."
                warnings.warn(f"{e}{moved} Falling back to the previous intact step.")
        raise CheckpointCorruptError(
            f"No intact {step!r} step left in {self._directory}; every candidate was corrupt:\n"
            + "\n".join(errors),
            self._directory,
        )

    def candidates(self, which: str) -> list[int]:
        """Steps in the order a fallback tries them: "latest" newest first, "best" best first."""
        if which == "best":
            return self._policy.ranked_best(self._metrics_by_step())
        return self.all_steps()[::-1]

    def _restore_step(self, target: PyTree, step: int, verify: bool) -> PyTree:
        restored = read_state(self.step_dir(step), flax.serialization.to_state_dict(target), verify=verify)
        return flax.serialization.from_state_dict(target, restored)

    def verify(self, step: int | str = "latest") -> None:
        """Reads every array of a step (as numpy) and checks it against its saved checksum.

        Raises:
          CheckpointCorruptError: naming the step directory, if it is unreadable or altered.
        """
        verify_state(self.step_dir(self._resolve_step(step)))

    def quarantine(self, step: int) -> storage.AnyPath:
        """Moves a step directory to `DIRECTORY/corrupt/<step>` (never deletes it); returns the new path."""
        if self._read_only:
            raise ValueError(f"This CheckpointManager for {self._directory} is read-only; it moves nothing.")
        self.wait()
        dest = move_aside(self._directory, step)
        self._metrics.forget(step)
        self._mngr.reload()
        return dest

    # Lifetime.

    def close(self) -> None:
        """Waits for the background save, then releases Orbax's threads.

        Raises:
          CheckpointSaveError: if the last background save failed.
        """
        try:
            self.wait()
        finally:
            self._mngr.close()
            self._s3.close()
            if self._unregister is not None:
                self._unregister()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
