"""The README's promises: two set-up commands first, and a Python example that runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_opens_with_exactly_two_commands():
    first = re.search(r"^```\w*\n(.*?)^```", README, flags=re.S | re.M).group(1)
    commands = [line for line in first.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "experiments/run.py --config experiments/configs/digits.py" in commands[0]
    assert "pytest" in commands[1]


def test_python_example_runs(tmp_path):
    (example,) = _blocks("python")
    code = example.replace("/tmp/demo", str(tmp_path / "demo"))
    env = {**os.environ, "XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mismatched" in done.stdout
    kept = sorted(int(p.name) for p in (tmp_path / "demo" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [4, 5]


def test_plain_orbax_snippets_run_from_the_repository_root_as_written(tmp_path):
    # Orbax refuses relative paths: the snippets must work from where README commands run (the
    # repository root, with runs/digits from the first command). A format fixture stands in for it.
    import shutil

    snippet = re.search(r"^```\n(import os, jax.*?ocp\.PyTreeCheckpointer\(\).*?)^```", README, flags=re.S | re.M).group(1)
    composite = re.search(r"\(`(ocp\.CheckpointManager\(.*?\))`", README).group(1)
    fixture = ROOT / "tests" / "fixtures" / "formats" / "v0.1.0-45c96e5" / "checkpoints" / "6"
    shutil.copytree(fixture, tmp_path / "runs" / "digits" / "checkpoints" / "600")
    code = snippet + f"\nprint(sorted(params))\nrestored = {composite}\nprint(sorted(restored.state['params']))\n"
    env = {**os.environ, "XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["['encoder', 'fusion', 'head']"] * 2
