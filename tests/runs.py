"""Helpers for end-to-end tests: tiny digits configs and running experiments/run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.configs import digits

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data_dir: str | os.PathLike, **overrides):
    """The digits config shrunk to seconds: 40 steps, eval/save every 20, log every 10."""
    config = digits.get_config()
    config.data.data_dir = str(data_dir)
    config.train.num_steps = 40
    config.train.batch_size = 32
    config.train.eval_every_steps = 20
    config.train.log_every_steps = 10
    config.checkpoint.every_steps = 20
    config.checkpoint.async_save = False
    config.eval.batch_size = 128
    config.model.encoder_dims = (32,)
    config.model.fusion_dims = (16,)
    return override(config, **overrides)


def override(config, **overrides):
    """Sets dotted keys (`**{"train.num_steps": 3}`), as `--config.train.num_steps=3` would."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def run_cli(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python experiments/run.py ARGS` from the repository root; returns the finished process."""
    full_env = {**os.environ, "XLA_FLAGS": "", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tiny_flags(data_dir: str | os.PathLike, **overrides) -> list[str]:
    """`--config ... --config.KEY=VALUE` arguments for experiments/run.py giving `tiny_config(data_dir, **overrides)`."""
    config, base = tiny_config(data_dir, **overrides), digits.get_config()
    flags = ["--config", "experiments/configs/digits.py"]
    for section, fields in config.items():
        if not hasattr(fields, "items"):
            if fields != base[section]:
                flags.append(f"--config.{section}={fields}")
            continue
        for key, value in fields.items():
            if value != base[section][key]:
                flags.append(f"--config.{section}.{key}={value}")
    return flags
