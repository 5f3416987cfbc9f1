"""Lets Orbax write and read arrays on `s3://`, which orbax-checkpoint 0.12.8 cannot do by itself.

Orbax decides where tensorstore reads and writes an array in one function,
`orbax.checkpoint._src.serialization.tensorstore_utils.build_kvstore_tspec`, which every caller
(the array handler, OCDBT merges, sharding metadata) looks up on its module at call time. It
knows `gs://` only: for `s3://bucket/key` it builds `{"driver": "file", "path": "s3:/bucket/key"}`
(`os.path.normpath` eats a slash), so OCDBT saves fail ("Checkpoint path should be absolute")
and non-OCDBT saves write the arrays under `./s3:/` on local disk. Orbax 0.12.8 offers no
public hook for the kvstore (`AtomicityOptions`, `FileOptions` and the type handler registry
do not reach it), so this module wraps that one function: an `s3://` directory is handed to
Orbax as `gs://` (so every remote-store decision Orbax makes, such as read coalescing, is the
same) and each `gcs` spec in the result is replaced by `storage.kvstore_spec`'s `s3` spec, which
carries the endpoint. Any other path goes to Orbax's function untouched.

The wrapper is installed only on Orbax versions it was tested with (`TESTED_ORBAX_VERSIONS`);
any other version is refused with the fix, and a version that handles `s3://` itself needs
no wrapper, so none is installed. Orbax also needs `storage.atomicity_options` (COMMIT_FILE)
on `s3://`: S3 has no rename.

Where it plugs in: `jaxckpt.checkpoint.manager.CheckpointManager` enters `orbax_s3()` when its
directory is an `s3://` URL and leaves it in `close()`; `stepdir` and `weights.pretrained`
reads of another run's `s3://` checkpoint do the same around Orbax's restore. A user of plain
Orbax calls `enable_orbax_s3()` once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import tensorstore_utils

from jaxckpt.checkpoint import storage
from jaxckpt.errors import UserError

TESTED_ORBAX_VERSIONS = ("0.12.8",)
"""orbax-checkpoint versions whose `build_kvstore_tspec` this module was tested against."""

_GCS_DRIVERS = ("gcs", "gcs_grpc")  # Orbax picks the latter with TENSORSTORE_GCS_BACKEND=gcs_grpc
_lock = threading.Lock()
_users = 0
_permanent = False
_original: Any = None


def _s3_specs(spec: Any, bucket: str) -> Any:
    """`spec` with each GCS kvstore spec on `bucket` replaced by the S3 spec of the same path."""
    if isinstance(spec, list):
        return [_s3_specs(item, bucket) for item in spec]
    if not isinstance(spec, dict):
        return spec
    if spec.get("driver") in _GCS_DRIVERS and spec.get("bucket") == bucket:
        return {**spec, "driver": "s3", **storage.s3_driver_options()}
    return {key: _s3_specs(value, bucket) for key, value in spec.items()}


def _build_kvstore_tspec(directory: str, *args: Any, **kwargs: Any) -> Any:
    if not str(directory).startswith("s3://"):
        return _original(directory, *args, **kwargs)
    rest = str(directory)[len("s3://"):]
    return _s3_specs(_original(f"gs://{rest}", *args, **kwargs), rest.split("/", 1)[0])


def _native_s3() -> bool:
    """Whether this Orbax builds an `s3` spec for `s3://` itself (then nothing is installed)."""
    spec = tensorstore_utils.build_kvstore_tspec("s3://bucket/probe", use_ocdbt=False)
    return isinstance(spec, dict) and spec.get("driver") == "s3"


def _check_version(allow_untested: bool) -> None:
    version = getattr(ocp, "__version__", "unknown")
    if version not in TESTED_ORBAX_VERSIONS and not allow_untested:
        raise UserError(
            f"s3:// checkpoints need a patch of orbax-checkpoint internals that was tested with "
            f"{', '.join(TESTED_ORBAX_VERSIONS)}, but {version} is installed. Install a tested "
            f"version (pip install 'orbax-checkpoint=={TESTED_ORBAX_VERSIONS[-1]}'), or use gs:// "
            "or a local path; `enable_orbax_s3(allow_untested=True)` tries anyway.")
    if not callable(getattr(tensorstore_utils, "build_kvstore_tspec", None)):
        raise UserError(f"orbax-checkpoint {version} has no tensorstore_utils.build_kvstore_tspec, "
                        "which s3:// support wraps; install orbax-checkpoint=="
                        f"{TESTED_ORBAX_VERSIONS[-1]}.")


def _install(allow_untested: bool) -> None:
    global _original
    if _original is not None or _native_s3():
        return
    _check_version(allow_untested)
    _original = tensorstore_utils.build_kvstore_tspec
    tensorstore_utils.build_kvstore_tspec = _build_kvstore_tspec


def _uninstall() -> None:
    global _original
    # Only our own wrapper is taken out: if someone wrapped it again since, theirs stays (with ours inside).
    if _original is not None and tensorstore_utils.build_kvstore_tspec is _build_kvstore_tspec:
        tensorstore_utils.build_kvstore_tspec = _original
        _original = None


def installed() -> bool:
    """Whether Orbax currently builds `s3` kvstore specs through this module."""
    return tensorstore_utils.build_kvstore_tspec is _build_kvstore_tspec


@contextlib.contextmanager
def orbax_s3(*, allow_untested: bool = False) -> Iterator[None]:
    """While inside, Orbax reads and writes arrays on `s3://` through tensorstore's `s3` driver.

    Re-entrant and thread-safe (a count of users): Orbax is restored when the last user leaves,
    unless `enable_orbax_s3` made it permanent. Other paths are never affected. Keep it open for
    as long as Orbax may write in the background (e.g. around a `CheckpointManager`'s whole life).

    Args:
      allow_untested: install on an Orbax version not in `TESTED_ORBAX_VERSIONS`.

    Raises:
      UserError: on an untested Orbax version (the message gives the version to install).

    Example:
      >>> with orbax_s3(), ocp.CheckpointManager("s3://bucket/ckpt", options=ocp.CheckpointManagerOptions(
      ...         atomicity_options=storage.atomicity_options("s3://bucket/ckpt"))) as mngr:  # doctest: +SKIP
      ...   mngr.save(0, args=ocp.args.StandardSave(state))
    """
    global _users
    with _lock:
        _install(allow_untested)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and not _permanent:
                _uninstall()


def for_path(path: Any) -> contextlib.AbstractContextManager:
    """`orbax_s3()` for an `s3://` path, else a context that does nothing (Orbax handles it)."""
    return orbax_s3() if str(path).startswith("s3://") else contextlib.nullcontext()


def enable_orbax_s3(*, allow_untested: bool = False) -> None:
    """Makes Orbax handle `s3://` for the rest of the process (for programs using plain Orbax).

    Args:
      allow_untested: install on an Orbax version not in `TESTED_ORBAX_VERSIONS`.

    Raises:
      UserError: on an untested Orbax version (the message gives the version to install).
    """
    global _permanent
    with _lock:
        _install(allow_untested)
        _permanent = True
