"""Tests for jaxckpt.runner.extra: without the `runner` extra the core works and the runner says what to install."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxckpt.errors import MissingDependencyError, UserError
from jaxckpt.runner import extra

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(extra.RUNNER_PACKAGES))
def test_a_missing_runner_package_is_one_line_naming_the_extra(monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # Makes `import name` fail, as if not installed.
    with pytest.raises(MissingDependencyError) as info:
        extra.require_runner_extra()
    message = str(info.value)
    assert "\n" not in message
    assert extra.RUNNER_PACKAGES[name] in message and "pip install 'jaxckpt[runner]'" in message
    assert isinstance(info.value, UserError) and isinstance(info.value, ImportError)


def test_with_every_package_present_nothing_is_raised():
    assert extra.missing_packages() == []
    extra.require_runner_extra()


def test_without_the_extra_the_core_imports_and_the_runner_and_cli_say_what_to_install():
    script = textwrap.dedent("""
        import sys
        sys.modules["tqdm"] = None  # as if installed without the runner extra
        import jaxckpt
        jaxckpt.graft, jaxckpt.load_params, jaxckpt.CheckpointManager, jaxckpt.TrainState, jaxckpt.make_train_step
        try:
            jaxckpt.run
        except jaxckpt.errors.MissingDependencyError as e:
            print("run:", e)
        from jaxckpt.cli import main
        print("cli exit code:", main(["zoo", "list"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run: the jaxckpt runner and command line need tqdm, which the core install leaves out: " \
           "pip install 'jaxckpt[runner]'" in done.stdout
    assert "cli exit code: 2" in done.stdout
    assert done.stderr.strip().splitlines() == [
        "jaxckpt: error: the jaxckpt runner and command line need tqdm, which the core install leaves out: "
        "pip install 'jaxckpt[runner]'"]
