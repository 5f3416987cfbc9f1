"""Tests for jaxckpt.runner.logs: the filters that quiet library logs."""

import logging

import pytest

from jaxckpt.runner import logs


def _record(level, msg, pathname):
    return logging.LogRecord("absl", level, pathname, 1, msg, ("/runs/x",), None)


@pytest.mark.parametrize("level, msg, path, kept", [
    (logging.WARNING, "Given directory is read only=%s", "/site-packages/orbax/checkpoint/checkpoint_manager.py", False),
    (logging.WARNING, "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
     "/site-packages/orbax/checkpoint/checkpoint_manager.py", False),
    # Anything else passes: errors, other Orbax warnings, the same words from elsewhere.
    (logging.ERROR, "Given directory is read only=%s", "/site-packages/orbax/checkpoint/checkpoint_manager.py", True),
    (logging.WARNING, "Failed to save %s", "/site-packages/orbax/checkpoint/checkpoint_manager.py", True),
    (logging.WARNING, "Given directory is read only=%s", "/home/me/train.py", True),
])
def test_only_orbax_read_only_notes_are_dropped(level, msg, path, kept):
    logs.quiet_library_logs()
    absl_logger = logging.getLogger("absl")
    assert absl_logger.filter(_record(level, msg, path)) is kept
    logs.quiet_library_logs()  # idempotent: one filter of each kind
    assert sum(isinstance(f, logs._NoReadOnlyNotes) for f in absl_logger.filters) == 1
