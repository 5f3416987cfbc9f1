"""The config-driven runner: one application of the library; needs the `runner` extra (see `extra`)."""

from jaxckpt.runner.extra import require_runner_extra

require_runner_extra()
