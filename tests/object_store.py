"""Local GCS and S3 emulators for tests of workdirs on `gs://` and `s3://`.

`gcs_emulator` and `s3_emulator` are session-scoped fixtures: each starts its server on 127.0.0.1
as a subprocess, creates a bucket, points every client at it through the environment (gcsfs,
google-cloud-storage and tensorstore for GCS; s3fs/botocore and tensorstore for S3) and yields a
base URL unique to the session, e.g. `gs://jaxckpt-test/3f2a...`. conftest.py registers them once
for every test module. A test module must not import them itself: pytest would then start a second
emulator for that module and point the environment at it, while fsspec keeps serving the
filesystem instance it made for the first (gcsfs and s3fs read the endpoint once, when created),
so epath and tensorstore would talk to different servers.

GCS is served by `gcs_emulator_patched.py` (gcp-storage-emulator made to honour generation
preconditions); S3 by moto's server. Neither needs anything beyond loopback.
"""

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

BUCKET = "jaxckpt-test"
_START_TIMEOUT_S = 60.0
_GCS_LAUNCHER = pathlib.Path(__file__).with_name("gcs_emulator_patched.py")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gcs_environment(endpoint: str) -> dict[str, str]:
    """The variables that point gcsfs, google-cloud-storage and tensorstore at a GCS emulator."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs, google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": endpoint,  # tensorstore's `gcs` kvstore driver
        # tensorstore sends this bearer token instead of looking for credentials (which would
        # probe the GCE metadata server).
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        # Read when gcsfs is imported: else gcsfs probes each bucket for zonal/hierarchical
        # namespace support over gRPC, waiting 60 s per call for an endpoint that is not there.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # google-auth (gcsfs' default credentials) would otherwise probe the GCE metadata server.
        "NO_GCE_CHECK": "true",
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables that point botocore/s3fs and tensorstore at an S3 emulator."""
    return {
        # botocore >= 1.31, hence s3fs. tensorstore's `s3` driver ignores it: its spec needs
        # `"endpoint"` (see `jaxckpt.checkpoint.storage.kvstore_spec`), else it tries AWS itself and hangs offline.
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probes for credentials
        "NO_PROXY": "127.0.0.1,localhost",
    }


def stop_emulator(process: subprocess.Popen) -> None:
    """Stops an emulator process: politely, then for sure."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _launch(command: list[str], health_url: str, name: str) -> subprocess.Popen:
    """Starts `command` and returns once `health_url` answers (any HTTP status)."""
    # Logs go to a file, not a pipe: moto logs every request, and a full pipe would block it.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=2):
                return process
        except urllib.error.HTTPError:
            return process
        except OSError:
            if process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            stop_emulator(process)
            log.seek(0)
            raise RuntimeError(f"{name} did not answer {health_url} (exit code {process.returncode}):\n"
                               f"{log.read().decode(errors='replace')[-2000:]}") from None


def start_gcs_emulator(*, patched: bool = True) -> tuple[subprocess.Popen, str]:
    """Starts the GCS emulator with bucket `BUCKET`; returns the process and its endpoint URL."""
    port = free_port()
    command = [sys.executable, str(_GCS_LAUNCHER), "--port", str(port), "--bucket", BUCKET]
    endpoint = f"http://127.0.0.1:{port}"
    process = _launch(command + ([] if patched else ["--unpatched"]), endpoint + "/", "the GCS emulator")
    return process, endpoint


def start_s3_emulator() -> tuple[subprocess.Popen, str]:
    """Starts moto's S3 server with bucket `BUCKET`; returns the process and its endpoint URL."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    endpoint = f"http://127.0.0.1:{port}"
    process = _launch(command, endpoint + "/moto-api/", "moto's S3 server")
    try:
        # moto checks no signatures, so a plain PUT creates the bucket (in us-east-1).
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=10)
    except BaseException:
        stop_emulator(process)
        raise
    return process, endpoint


@pytest.fixture(scope="session")
def gcs_emulator():
    """`gs://` base URL, unique to the session, on a local GCS emulator (see module doc)."""
    process, endpoint = start_gcs_emulator()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in gcs_environment(endpoint).items():
            mp.setenv(name, value)
        try:
            yield f"gs://{BUCKET}/{uuid.uuid4().hex}"
        finally:
            stop_emulator(process)


@pytest.fixture(scope="session")
def s3_emulator():
    """`s3://` base URL, unique to the session, on a local moto S3 server (see module doc)."""
    process, endpoint = start_s3_emulator()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_environment(endpoint).items():
            mp.setenv(name, value)
        try:
            yield f"s3://{BUCKET}/{uuid.uuid4().hex}"
        finally:
            stop_emulator(process)


def main(argv: list[str]) -> int:
    """`python -m tests.object_store {gcs,s3} COMMAND...`: COMMAND against a fresh local emulator.

    Starts the emulator with bucket `jaxckpt-test`, runs COMMAND with the environment that points
    every client at it, and stops the emulator when COMMAND ends (the objects go with it).
    """
    if len(argv) < 2 or argv[0] not in ("gcs", "s3"):
        print("usage: python -m tests.object_store {gcs,s3} COMMAND [ARG...]\n"
              f"  runs COMMAND with a local emulator of that store, bucket {BUCKET}", file=sys.stderr)
        return 2
    process, endpoint = start_gcs_emulator() if argv[0] == "gcs" else start_s3_emulator()
    env = gcs_environment(endpoint) if argv[0] == "gcs" else s3_environment(endpoint)
    try:
        return subprocess.call(argv[1:], env={**os.environ, **env})
    finally:
        stop_emulator(process)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
