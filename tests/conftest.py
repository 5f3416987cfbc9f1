"""Shared test set-up: fake several CPU devices so sharding paths are exercised on one machine."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment is set)
from object_store import gcs_emulator, s3_emulator  # noqa: E402, F401  (session fixtures, started on first use)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tfds data directory per test module: each module prepares the digits dataset once."""
    return tmp_path_factory.mktemp("tfds")
