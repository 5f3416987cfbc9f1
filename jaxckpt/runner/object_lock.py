"""The workdir lock on object storage: a create-only lock object with a lease that its holder renews.

A local workdir is locked with `flock` (`jaxckpt.runner.lock.WorkdirLock`), which the kernel
drops when the holder dies. An object store has no such thing, so `ObjectLock` writes
`WORKDIR/.lock` only if no object is there (GCS: `ifGenerationMatch=0`; S3: `If-None-Match: *`),
holding the holder's id, host, pid and a lease expiry. A background thread renews the lease
every `lease_s / 3` seconds by overwriting the object only if it is still the version this
holder wrote (the generation on GCS, the ETag on S3), so a holder whose lock was taken over
notices (`check()` raises). A second run finds a live lease and is refused, naming the holder; a
lease nobody renewed (its run was killed) is taken over once it has expired, by the same
conditional overwrite, so of two runs racing for it one wins; the log says whose lease it was.

Expiry compares the holder's recorded wall-clock time with the reader's clock, so hosts
sharing a workdir need clocks within a small fraction of the lease (NTP gives milliseconds;
the default lease is 60 s).

Clients: google-cloud-storage for `gs://` and boto3 for `s3://`, imported when a lock is
created; they come with `pip install 'jaxckpt[gcs]'` / `'jaxckpt[s3]'`.

Where it plugs in: the runner takes its workdir lock through `lock_for(workdir)` instead of
`WorkdirLock(workdir)`, and may call `lock.check()` before each save to stop a run whose lock
was taken over (a local lock's `check` never raises).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Protocol

from jaxckpt.checkpoint import storage
from jaxckpt.errors import MissingDependencyError, WorkdirError
from jaxckpt.runner.lock import WorkdirLock

log = logging.getLogger("jaxckpt")

LOCK_NAME = ".lock"
DEFAULT_LEASE_S = 60.0
_ACQUIRE_ATTEMPTS = 5  # create/read races with a holder releasing at the same moment


class _Store(Protocol):
    """Conditional operations on one object; a token is the version a write produced."""

    def create(self, data: bytes) -> str | None: ...  # None: the object exists
    def read(self) -> tuple[bytes, str] | None: ...  # None: no object
    def replace(self, data: bytes, token: str) -> str | None: ...  # None: not at `token` any more
    def delete(self, token: str) -> bool: ...  # False: not at `token` any more


class _GcsStore:
    def __init__(self, bucket: str, key: str):
        try:
            # Not `from google.cloud import storage`, which finds the attribute of an imported
            # `google.cloud` even where the module cannot be imported.
            import google.cloud.storage as gcs
            from google.api_core import exceptions
        except ImportError:
            raise MissingDependencyError(f"a workdir lock on gs://{bucket} needs google-cloud-storage: "
                                         "pip install 'jaxckpt[gcs]'") from None
        self._failed = (exceptions.PreconditionFailed, exceptions.NotFound)
        self._bucket = gcs.Client().bucket(bucket)
        self._key = key

    def create(self, data: bytes) -> str | None:
        return self.replace(data, "0")

    def read(self) -> tuple[bytes, str] | None:
        blob = self._bucket.get_blob(self._key)
        if blob is None:
            return None
        try:
            return blob.download_as_bytes(if_generation_match=blob.generation), str(blob.generation)
        except self._failed:
            return self.read()  # replaced or deleted between the two calls: look again

    def replace(self, data: bytes, token: str) -> str | None:
        blob = self._bucket.blob(self._key)
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=int(token))
        except self._failed:
            return None
        return str(blob.generation)

    def delete(self, token: str) -> bool:
        try:
            self._bucket.blob(self._key).delete(if_generation_match=int(token))
        except self._failed:
            return False
        return True


class _S3Store:
    def __init__(self, bucket: str, key: str):
        try:
            import boto3
            import botocore.exceptions
        except ImportError:
            raise MissingDependencyError(
                f"a workdir lock on s3://{bucket} needs boto3: pip install 'jaxckpt[s3]'") from None
        self._client_error = botocore.exceptions.ClientError
        self._s3 = boto3.client("s3")
        self._where = {"Bucket": bucket, "Key": key}

    def _refused(self, error: Exception) -> bool:
        code = error.response.get("Error", {}).get("Code", "")
        # 409 ConditionalRequestConflict: a concurrent conditional write won.
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409")

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            response = self._s3.put_object(Body=data, ContentType="application/json", **self._where,
                                           **condition)
            return response["ETag"]
        except self._client_error as error:
            if self._refused(error):
                return None
            raise

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str] | None:
        try:
            response = self._s3.get_object(**self._where)
        except self._client_error as error:
            if self._refused(error):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def replace(self, data: bytes, token: str) -> str | None:
        return self._put(data, IfMatch=token)

    def delete(self, token: str) -> bool:
        try:
            self._s3.delete_object(**self._where, IfMatch=token)
        except self._client_error as error:
            if self._refused(error):
                return False
            if error.response.get("Error", {}).get("Code") != "NotImplemented":
                raise
            # A store without conditional deletes: check, then delete (a takeover in between
            # would need this run's lease to have expired while it was releasing).
            current = self.read()
            if current is None or current[1] != token:
                return False
            self._s3.delete_object(**self._where)
        return True


def _store_for(url: str) -> _Store:
    scheme, bucket, key = storage.split_url(url)
    return (_GcsStore if scheme == "gs" else _S3Store)(bucket, key)


def _parse(data: bytes) -> dict[str, Any]:
    """A lock object's record; an unreadable one counts as long expired, so it can be taken over."""
    try:
        record = json.loads(data)
        return {**record, "expires_at": float(record["expires_at"])}
    except (ValueError, KeyError, TypeError):
        return {"holder": f"unreadable lock object ({data[:60]!r})", "expires_at": 0.0}


def _describe(record: dict[str, Any]) -> str:
    return (f"run {record.get('holder', '?')} (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"lease until {_when(record.get('expires_at', 0))})")


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


class ObjectLock:
    """Exclusive lock on a run directory on `gs://` or `s3://`, held by a renewed lease.

    Same interface as `WorkdirLock` (`acquire`, `release`, context manager), plus `check`.

    Args:
      workdir: the run directory URL; the lock is the object `WORKDIR/.lock`.
      lease_s: how long the lock outlives its holder's last renewal; renewed every third of it.

    Example:
      >>> with ObjectLock("gs://bucket/runs/a"):  # doctest: +SKIP
      ...   train()
    """

    def __init__(self, workdir: os.PathLike | str, *, lease_s: float = DEFAULT_LEASE_S):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.path = storage.as_path(workdir) / LOCK_NAME
        self.lease_s = float(lease_s)
        self.holder = uuid.uuid4().hex[:12]
        self._store = _store_for(str(self.path))
        self._token: str | None = None
        self._expires_at = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._state_lock = threading.Lock()

    def _record(self) -> bytes:
        self._expires_at = time.time() + self.lease_s
        return json.dumps({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                           "lease_s": self.lease_s, "expires_at": self._expires_at}).encode()

    def acquire(self) -> "ObjectLock":
        """Creates the lock object, or takes over one whose lease has expired, then starts renewing.

        Returns:
          This lock, held.

        Raises:
          WorkdirError: if another run holds a live lease; the message names it and when its
            lease ends.
        """
        if self.held:
            return self
        for _ in range(_ACQUIRE_ATTEMPTS):
            token = self._store.create(self._record())
            if token is not None:
                return self._held(token)
            current = self._store.read()
            if current is None:
                continue  # released in between: create again
            data, token = current
            record = _parse(data)
            expires_at, now = record["expires_at"], time.time()
            if expires_at > now:
                raise WorkdirError(
                    f"workdir {self.path.parent} is in use by {_describe(record)}. Two runs must not write "
                    "one workdir: wait for it to finish, stop it, or pass another --workdir. If that run "
                    f"is dead, its lease ends in {expires_at - now:.0f} s and the next run takes over.")
            new = self._store.replace(self._record(), token)
            if new is not None:
                log.warning("took over the lock of workdir %s from %s: its lease expired %.0f s ago, "
                            "so that run is presumed dead (killed without releasing it)",
                            self.path.parent, _describe(record), now - expires_at)
                return self._held(new)
        raise WorkdirError(f"could not take the lock {self.path}: it changed hands {_ACQUIRE_ATTEMPTS} times "
                           "while trying; another run is starting on this workdir. Pass another --workdir.")

    def _held(self, token: str) -> "ObjectLock":
        self._token, self._lost = token, None
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_until_stopped, name=f"lease {self.path}",
                                         daemon=True)
        self._renewer.start()
        return self

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._state_lock:
                if self._token is None or self._lost:
                    return
                expires_at = self._expires_at
                try:
                    token = self._store.replace(self._record(), self._token)
                except Exception as error:  # a transient failure: try again next time, while the lease lasts
                    self._expires_at = expires_at
                    if time.time() < expires_at:
                        log.warning("could not renew the lease of %s (%s); retrying", self.path, error)
                        continue
                    self._lose(f"its lease expired at {_when(expires_at)} before it could be renewed "
                               f"({error})")
                    return
                if token is None:
                    current = self._store.read()
                    other = _describe(_parse(current[0])) if current else "nobody (the object was deleted)"
                    self._lose(f"it is now held by {other}")
                    return
                self._token = token

    def _lose(self, why: str) -> None:
        self._lost = (f"lost the lock of workdir {self.path.parent}: {why}. Another run may be writing "
                      "this workdir; stop this run and check which one should continue.")
        log.error("%s", self._lost)

    def check(self) -> None:
        """Raises if the lock was lost (taken over after a missed renewal); call before writing.

        Raises:
          WorkdirError: naming who holds it now, or why the lease lapsed.
        """
        if self._lost:
            raise WorkdirError(self._lost)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (acquired, not released, not lost)."""
        return self._token is not None and not self._lost

    def release(self) -> None:
        """Stops renewing and deletes the lock object if it is still this holder's; idempotent."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        with self._state_lock:
            token, self._token = self._token, None
            if token is not None and not self._lost and not self._store.delete(token):
                log.warning("the lock object %s was no longer ours when this run released it", self.path)

    def __enter__(self) -> "ObjectLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_for(workdir: os.PathLike | str, *, lease_s: float = DEFAULT_LEASE_S) -> Any:
    """The workdir lock for `workdir`: `ObjectLock` for a `gs://`/`s3://` URL, else the local flock lock.

    Args:
      workdir: the run directory.
      lease_s: the object lock's lease (ignored for local paths, whose lock dies with its process).

    Returns:
      An unheld lock with `acquire`, `release`, `check` and context-manager use: an `ObjectLock`,
      or a `WorkdirLock` (with a `check` that never raises).
    """
    return ObjectLock(workdir, lease_s=lease_s) if storage.is_url(workdir) else LocalLock(workdir)


class LocalLock(WorkdirLock):
    """`WorkdirLock` (flock) with the `check` of `ObjectLock`, so callers need not ask which they hold."""

    def check(self) -> None:
        """Never raises: a flock is held until released or until its process dies."""
