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


def _section(heading: str) -> str:
    return README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_python_example_runs_and_runs_again(tmp_path):
    (example,) = re.findall(r"^```python\n(.*?)^```", _section("The Python API in 30 lines"), flags=re.S | re.M)
    # The example writes into a fresh temporary directory; TMPDIR puts it under tmp_path.
    env = {**os.environ, "XLA_FLAGS": "", "TMPDIR": str(tmp_path)}
    for run in (1, 2):  # pasted twice, it must work twice
        done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, f"run {run}: " + done.stderr[-3000:]
        assert "mismatched" in done.stdout
    workdirs = sorted(tmp_path.glob("jaxckpt-demo-*"))
    assert len(workdirs) == 2
    for workdir in workdirs:
        kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert kept == [4, 5]


def test_commands_use_the_set_up_environment():
    # The set-up never activates .venv, so a pasted `python ...` would run another interpreter.
    # Lines of every fenced block without a language or in bash, including those indented in list items.
    commands, language = [], None
    for line in README.splitlines():
        if line.strip().startswith("```"):
            language = line.strip()[3:] if language is None else None
        elif language in ("", "bash"):
            commands.append(line.strip())
    bare = [c for c in commands if c.startswith(("python ", "pip "))]
    assert bare == []
    assert sum(c.startswith(".venv/bin/python experiments/run.py") for c in commands) >= 10


def test_bring_your_own_task_example_trains_and_resumes(tmp_path):
    (example,) = re.findall(r"^```python\n(.*?)^```", _section("Bring your own task"), flags=re.S | re.M)
    assert len(example.strip().splitlines()) < 60
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr[-3000:]
    first_loss = float(runs[0].stdout.split()[-1])
    assert runs[0].stdout.split()[0] == runs[1].stdout.split()[0] == "300"
    assert first_loss < 0.1  # it learned sin(x0 + x1) (the mean of y**2 is about 0.5)
    assert float(runs[1].stdout.split()[-1]) == first_loss  # the second run resumed at step 300, bitwise
    log = (tmp_path / "runs" / "sine" / "train.log").read_text()
    assert "resuming from this workdir's latest checkpoint, step 300" in log
    steps = sorted(int(p.name) for p in (tmp_path / "runs" / "sine" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [100, 200, 300]


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
