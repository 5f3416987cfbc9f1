"""Where checkpoints and run files live: local paths, `gs://bucket/key` and `s3://bucket/key`.

Every path that may be a URL goes through `as_path` (an `etils.epath.Path`: gcsfs for `gs://`,
s3fs for `s3://`), every tensorstore kvstore through `kvstore_spec`, and every Orbax
`CheckpointManager` on a URL takes `atomicity_options(directory)` and runs inside `orbax_s3()`
(see `jaxckpt.checkpoint.orbax_s3`). Small files a run writes (config.json, eval JSON,
curves.png) go through `write_bytes_atomic`, metrics.jsonl through `append_line`.

Where it plugs in: a workdir, checkpoint directory or step directory goes through `run_path`
(a `pathlib.Path` locally, an `epath.Path` for a URL); `state_item.item_kvstore_spec` builds its
OCDBT base from `kvstore_spec(item_dir, single_writer=True)`; `manager.CheckpointManager` passes
`atomicity_options(directory)` to Orbax; the run's small files go through `write_bytes_atomic` /
`append_line`. `local_path` is for the few paths that must stay local (it refuses URLs).

Object stores have no rename and no append. A checkpoint is committed by a marker object
(Orbax's `commit_success.txt`) instead of a directory rename; a small file is one PUT, which an
object store applies whole or not at all; an append rewrites the object (see `append_line`).
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import re
import tempfile
import typing
from typing import Any
from urllib import parse

import orbax.checkpoint as ocp
from etils import epath

from jaxckpt.errors import UserError

SCHEMES = ("gs", "s3")
"""URL schemes a workdir or checkpoint directory may use."""

# fsspec (under epath) expands these as globs in some calls (exists, rm, ls), so a key holding
# one would silently name other objects, or none.
_GLOB_CHARS = "[]*?"


def _no_listing_cache() -> None:
    """Turns off fsspec's listing cache for gcsfs and s3fs (before any of their file systems is made).

    That cache never expires by default and sees only writes made through fsspec itself, while
    tensorstore and other processes (the trainer a follower watches) write objects behind it: a
    cached listing would hide new steps, or show deleted ones, for the life of the process.
    """
    try:
        import fsspec.config
    except ImportError:  # no object-store client installed: nothing to configure
        return
    for protocol in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listing_cache()


def is_url(path: os.PathLike | str) -> bool:
    """Whether `path` is an object-store URL (`gs://...` or `s3://...`) rather than a local path.

    Example:
      >>> is_url("gs://bucket/run"), is_url("runs/digits")
      (True, False)
    """
    return parse.urlsplit(os.fspath(path)).scheme in SCHEMES and "://" in os.fspath(path)


def split_url(url: os.PathLike | str) -> tuple[str, str, str]:
    """Splits an object-store URL into `(scheme, bucket, key)`; the key has no leading or trailing `/`.

    `..` and repeated slashes in the key are resolved, as for a local path.

    Raises:
      UserError: for a local path, an unsupported scheme, a URL without a bucket, a key that
        climbs above the bucket, or a key with a glob character (`[`, `]`, `*`, `?`).

    Example:
      >>> split_url("s3://bucket/runs/a/../b/")
      ('s3', 'bucket', 'runs/b')
    """
    text = os.fspath(url)
    parts = parse.urlsplit(text)
    if "://" not in text or parts.scheme not in SCHEMES:
        raise UserError(f"{text!r} is not a gs:// or s3:// URL; object storage paths look like "
                        "gs://BUCKET/PATH or s3://BUCKET/PATH.")
    if not parts.netloc:
        raise UserError(f"{text!r} names no bucket; write {parts.scheme}://BUCKET/PATH.")
    relative = parts.path.lstrip("/")
    key = posixpath.normpath(relative) if relative else ""
    if key == ".." or key.startswith("../"):
        raise UserError(f"{text!r} climbs above its bucket with '..'; remove the '..'.")
    key = "" if key == "." else key
    bad = sorted({c for c in key if c in _GLOB_CHARS})
    if bad:
        raise UserError(f"{text!r} contains {' '.join(bad)}, which the object-store file systems "
                        "read as glob patterns; rename the path without [ ] * ?.")
    return parts.scheme, parts.netloc, key


def as_path(path: os.PathLike | str) -> epath.Path:
    """`path` as an `epath.Path`: URLs stay URLs (normalised), local paths become absolute.

    Use it wherever a path may be a URL: `pathlib.Path("gs://b/x")` is the local folder
    `gs:/b/x`, and `os.path.normpath` turns `s3://b` into `s3:/b`.

    Args:
      path: a local path (`~` and `..` are resolved against the current directory) or a
        `gs://` / `s3://` URL.

    Returns:
      An `epath.Path`; its `str()` is the normalised URL or absolute local path.

    Raises:
      UserError: for a URL that `split_url` refuses (unsupported scheme, no bucket, glob
        characters), or any other `scheme://` path.

    Example:
      >>> str(as_path("gs://bucket/runs//a/../b/"))
      'gs://bucket/runs/b'
    """
    text = os.fspath(path)
    if is_url(text):
        scheme, bucket, key = split_url(text)
        return epath.Path(f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}")
    if "://" in text:
        split_url(text)  # raises, naming the schemes that work
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def kvstore_spec(path: os.PathLike | str, *, single_writer: bool = False) -> dict[str, Any]:
    """tensorstore's kvstore spec for a directory: the `file`, `gcs` or `s3` driver.

    The `s3` driver ignores `AWS_ENDPOINT_URL` (botocore's variable), so its `endpoint` is set
    from it here when it is set (an emulator, MinIO, another S3-compatible store); `aws_region`
    comes from `AWS_REGION` or `AWS_DEFAULT_REGION`. Credentials are the driver's own (the
    usual AWS variables and files; for GCS, application default credentials).

    Args:
      path: a local directory or a `gs://` / `s3://` URL; the spec's `path` ends with `/`, so
        keys are relative to it.
      single_writer: the caller is the only writer of this directory (e.g. a fresh item
        directory), so local files are written without lock files (tensorstore's
        `file_io_locking: non_atomic`, as Orbax does for OCDBT data files). No effect on URLs.

    Returns:
      A kvstore spec, to use as is or as the `base` of an `ocdbt` spec.

    Example:
      >>> kvstore_spec("gs://bucket/run/checkpoints/3/state")
      {'driver': 'gcs', 'bucket': 'bucket', 'path': 'run/checkpoints/3/state/'}
    """
    if not is_url(path):
        spec: dict[str, Any] = {"driver": "file", "path": str(as_path(path)) + "/"}
        if single_writer:
            spec["file_io_locking"] = {"mode": "non_atomic"}
        return spec
    scheme, bucket, key = split_url(path)
    spec = {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket, "path": key + "/" if key else ""}
    return {**spec, **s3_driver_options()} if scheme == "s3" else spec


def s3_driver_options() -> dict[str, str]:
    """`endpoint` and `aws_region` for tensorstore's `s3` driver, from the environment botocore reads.

    `endpoint` comes from `AWS_ENDPOINT_URL` (the driver ignores that variable), `aws_region`
    from `AWS_REGION` or `AWS_DEFAULT_REGION`; each is left out when unset.
    """
    options = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint"] = os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["aws_region"] = region
    return options


def atomicity_options(directory: os.PathLike | str) -> ocp.options.AtomicityOptions:
    """The atomicity an Orbax `CheckpointManager` on `directory` must use.

    On an object store a step is written in place and committed by a `commit_success.txt`
    marker written last (`COMMIT_FILE`): there is no directory rename, and s3fs emulates one by
    copying every object, which a kill interrupts half-way. Orbax picks that itself for
    `gs://` but not for `s3://`, so jaxckpt always says it. Readers need it too: a manager
    opened on `s3://` without it takes a step directory lacking its marker (a save killed
    half-way) for a finished step (tests/storage_test.py). Local paths keep Orbax's default
    (write to a temporary directory, then rename).

    Example:
      >>> atomicity_options("s3://bucket/ckpt").mode.value
      'commit_file'
    """
    mode = ocp.options.AtomicityMode.COMMIT_FILE if is_url(directory) else ocp.options.AtomicityMode.AUTO
    return ocp.options.AtomicityOptions(mode=mode)


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> None:
    """Writes a whole file so that a reader, or a crash, sees the old content or the new, never a part.

    Local: a temporary file in the same directory, fsync, then rename over `path`. Object
    store: one upload, which the store applies whole or not at all (no temporary object, which
    would need a copy to "rename").

    Args:
      path: the file (its directory is created if needed); local or a URL.
      data: the new content.
    """
    if is_url(path):
        as_path(path).write_bytes(data)  # no directories to create: keys are just names
        return
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=os.path.basename(target) + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_line(path: os.PathLike | str, line: str) -> None:
    """Appends one line (a newline is added if missing) to a text file such as `metrics.jsonl`.

    Local: an append-mode write. Object store: objects cannot be appended to, so the object is
    read, the line added, and the whole written back in one upload (`write_bytes_atomic`).
    This is safe because one run writes a workdir at a time (the workdir lock), and it keeps
    `metrics.jsonl` one object that every reader (curves, `follow`, early stopping, a user's
    `pandas.read_json`) reads as before. The cost is a read and a write of the whole file per
    call: `tests/storage_test.py` measures it; a few thousand logged points stay well under a
    second per append. (One object per point would make each append O(1) but every read a
    listing plus N downloads, and change the file's format for every reader.)

    Args:
      path: the file (created if missing); local or a URL.
      line: the text to add, e.g. `json.dumps(record)`.
    """
    data = (line if line.endswith("\n") else line + "\n").encode()
    if not is_url(path):
        target = os.path.abspath(os.path.expanduser(os.fspath(path)))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "ab") as f:
            f.write(data)
        return
    target = as_path(path)
    try:
        old = target.read_bytes()
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_bytes_atomic(path, old + data)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(path: os.PathLike | str, *, key: str | None = None) -> pathlib.Path:
    """`path` as an absolute, normalised local path (`~` expanded, `.` and `..` resolved textually).

    Args:
      path: a local path.
      key: the config key or argument it came from (e.g. "checkpoint.pretrained"), for the error.

    Raises:
      UserError: if `path` is a URL: for paths that must be local (use `run_path` elsewhere).
    """
    text = os.fspath(path)
    if _URL.match(text):
        where = f"{key}={text}" if key else text
        raise UserError(
            f"{where} is a URL; this setting takes local paths only. Copy the files to a local disk (e.g. with gsutil or "
            "aws s3 cp) and pass that path.")
    return pathlib.Path(os.path.normpath(os.path.abspath(os.path.expanduser(text))))


AnyPath = typing.Union[pathlib.Path, epath.Path]
"""A directory or file a run may use: a `pathlib.Path` locally, an `epath.Path` for a URL."""


def run_path(path: os.PathLike | str, *, key: str | None = None) -> AnyPath:
    """`path` as a run may use it: a normalised local `pathlib.Path`, or an `epath.Path` for a URL.

    Both have the `pathlib` methods a run needs (`/`, `exists`, `is_dir`, `iterdir`, `mkdir`,
    `open`, `read_text`, `write_bytes`, `glob`, `unlink`); what an object store lacks (rename,
    append, fsync) goes through `write_bytes_atomic` and `append_line`.

    Args:
      path: a local path (`~`, `.` and `..` resolved) or a `gs://` / `s3://` URL.
      key: the config key or argument it came from (e.g. "workdir"), for the error.

    Raises:
      UserError: for a URL `split_url` refuses (another scheme, no bucket, glob characters),
        naming `key`.

    Example:
      >>> str(run_path("gs://bucket/runs/a/../b")), run_path("/tmp/x/../y")
      ('gs://bucket/runs/b', PosixPath('/tmp/y'))
    """
    text = os.fspath(path)
    if not _URL.match(text):
        return local_path(text, key=key)
    try:
        return as_path(text)
    except UserError as e:
        raise UserError(f"{key}={text}: {e}" if key else str(e)) from None


def files_under(path: AnyPath) -> list[AnyPath]:
    """Every file below a directory, local or on an object store (epath's `rglob` refuses URLs).

    On an object store this is one recursive listing (fsspec's `find`), not a walk of "folders".
    """
    if not is_url(path):
        return sorted(pathlib.Path(root) / name for root, _, names in os.walk(path) for name in names)
    import fsspec  # (installed with gcsfs / s3fs, which a URL needs anyway)

    fs, root = fsspec.core.url_to_fs(str(path))
    fs.invalidate_cache(root)  # tensorstore writes objects behind fsspec's listing cache
    scheme = split_url(path)[0]
    return sorted(epath.Path(f"{scheme}://{key}") for key in fs.find(root))


def is_local(path: os.PathLike | str) -> bool:
    """Whether `path` is on a local (or mounted) file system, not an object store."""
    return not is_url(path)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: os.PathLike | str) -> None:
    """Gives a file or directory made by `tempfile` (0600 / 0700) the mode `open`/`mkdir` would give it.

    That is 0666 / 0777 less the umask (usually 0644 / 0755), so a file renamed into place from a
    private temporary name is as readable as one written directly.
    """
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())
