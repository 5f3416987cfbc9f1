"""The `runner` extra: what the runner and the command line import beyond the core install.

`pip install jaxckpt` installs what grafting, training steps, checkpoints and weight loading need;
`pip install 'jaxckpt[runner]'` adds the config-driven loop's and the command line's packages.
Importing `jaxckpt.runner` (or `jaxckpt.cli`) checks for them first, so a missing one is one line
naming it and the install command, not an `ImportError` from deep inside the loop.
"""

from __future__ import annotations

import importlib.util

from jaxckpt.errors import MissingDependencyError

INSTALL = "pip install 'jaxckpt[runner]'"

# Import name -> distribution name, for the packages jaxckpt.runner and jaxckpt.cli import themselves
# (the experiments' tfds and grain pipelines are in the extra too, but the library never imports them).
RUNNER_PACKAGES = {
    "ml_collections": "ml-collections",
    "absl": "absl-py",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "tensorboardX": "tensorboardX",
}


def missing_packages() -> list[str]:
    """The distributions of `RUNNER_PACKAGES` that cannot be imported here, without importing any."""
    return [dist for name, dist in RUNNER_PACKAGES.items() if importlib.util.find_spec(name) is None]


def require_runner_extra() -> None:
    """Raises if a package of the `runner` extra is missing.

    Raises:
        MissingDependencyError: naming the missing distributions and `pip install 'jaxckpt[runner]'`.
    """
    missing = missing_packages()
    if missing:
        raise MissingDependencyError(
            f"the jaxckpt runner and command line need {', '.join(missing)}, which the core install leaves "
            f"out: {INSTALL}")
