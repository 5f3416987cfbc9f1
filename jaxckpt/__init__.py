"""jaxckpt: pure-functional JAX training with pretrained grafts, checkpoint retention and exact resume.

This module is the one public face. Names are loaded on first use (PEP 562), so
`from jaxckpt import graft` imports the graft layer only, not the runner, tfds, grain or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    "CheckpointCorruptError": "jaxckpt.errors",
    "CheckpointFormatError": "jaxckpt.errors",
    "CheckpointManager": "jaxckpt.checkpoint.manager",
    "CheckpointNotFoundError": "jaxckpt.errors",
    "CheckpointReadError": "jaxckpt.errors",
    "CheckpointSaveError": "jaxckpt.errors",
    "ConfigError": "jaxckpt.errors",
    "Fuse": "jaxckpt.grafting.structure",
    "GraftEntry": "jaxckpt.grafting.report",
    "GraftReport": "jaxckpt.grafting.report",
    "MissingDependencyError": "jaxckpt.errors",
    "NonFiniteLossError": "jaxckpt.errors",
    "PREEMPTED_EXIT_CODE": "jaxckpt.errors",
    "Preempted": "jaxckpt.errors",
    "RetentionPolicy": "jaxckpt.checkpoint.retention",
    "Split": "jaxckpt.grafting.structure",
    "Stack": "jaxckpt.grafting.structure",
    "Task": "jaxckpt.runner.task",
    "TrainState": "jaxckpt.train.state",
    "Unstack": "jaxckpt.grafting.structure",
    "UserError": "jaxckpt.errors",
    "WorkdirError": "jaxckpt.errors",
    "WorkdirLock": "jaxckpt.runner.lock",
    "config_strings": "jaxckpt.config_strings",
    "default_config": "jaxckpt.runner.config",
    "describe_trainable": "jaxckpt.train.optim",
    "distributed": "jaxckpt.runner.distributed",
    "evaluate": "jaxckpt.runner.loop",
    "export_hf": "jaxckpt.weights.hf",
    "flatten": "jaxckpt.tree.treepath",
    "follow": "jaxckpt.runner.follow",
    "freeze_and_scale": "jaxckpt.train.optim",
    "graft": "jaxckpt.grafting.graft",
    "graft_foreign": "jaxckpt.weights.foreign",
    "label_tree": "jaxckpt.tree.pathmatch",
    "load_params": "jaxckpt.weights.pretrained",
    "load_task": "jaxckpt.runner.task",
    "make_eval_step": "jaxckpt.train.step",
    "make_mesh": "jaxckpt.runner.mesh",
    "make_optimizer": "jaxckpt.train.optim",
    "make_predict_step": "jaxckpt.train.step",
    "make_schedule": "jaxckpt.train.optim",
    "make_train_step": "jaxckpt.train.step",
    "match": "jaxckpt.tree.pathmatch",
    "mean_metrics": "jaxckpt.train.step",
    "plan": "jaxckpt.grafting.graft",
    "predict": "jaxckpt.runner.loop",
    "read_foreign": "jaxckpt.weights.foreign",
    "resolve_checkpoint_path": "jaxckpt.weights.pretrained",
    "run": "jaxckpt.runner.loop",
    "run_or_exit": "jaxckpt.cli.exits",
    "state_shardings": "jaxckpt.runner.mesh",
    "sum_metrics": "jaxckpt.train.step",
    "train_and_evaluate": "jaxckpt.runner.loop",
    "unflatten": "jaxckpt.tree.treepath",
    "unflatten_dict": "jaxckpt.tree.treepath",
    "update_ema": "jaxckpt.train.ema",
    "write_safetensors": "jaxckpt.weights.foreign",
}

# Public names that are modules rather than attributes of one.
_MODULES = frozenset({"config_strings", "distributed"})

__all__ = tuple(sorted(_EXPORTS))


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'jaxckpt' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if name in _MODULES else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from jaxckpt import config_strings
    from jaxckpt.checkpoint.manager import CheckpointManager
    from jaxckpt.checkpoint.retention import RetentionPolicy
    from jaxckpt.errors import (
        PREEMPTED_EXIT_CODE,
        CheckpointCorruptError,
        CheckpointFormatError,
        CheckpointNotFoundError,
        CheckpointReadError,
        CheckpointSaveError,
        MissingDependencyError,
        NonFiniteLossError,
        Preempted,
        UserError,
        WorkdirError,
    )
    from jaxckpt.grafting.graft import graft, plan
    from jaxckpt.grafting.report import GraftEntry, GraftReport
    from jaxckpt.grafting.structure import Fuse, Split, Stack, Unstack
    from jaxckpt.runner import distributed
    from jaxckpt.runner.config import default_config
    from jaxckpt.runner.follow import follow
    from jaxckpt.runner.lock import WorkdirLock
    from jaxckpt.runner.loop import evaluate, predict, run, train_and_evaluate
    from jaxckpt.runner.mesh import make_mesh, state_shardings
    from jaxckpt.runner.task import Task, load_task
    from jaxckpt.train.ema import update_ema
    from jaxckpt.train.optim import describe_trainable, freeze_and_scale, make_optimizer, make_schedule
    from jaxckpt.train.state import TrainState
    from jaxckpt.train.step import make_eval_step, make_predict_step, make_train_step, mean_metrics, sum_metrics
    from jaxckpt.tree.pathmatch import label_tree, match
    from jaxckpt.tree.treepath import flatten, unflatten, unflatten_dict
    from jaxckpt.weights.foreign import graft_foreign, read_foreign, write_safetensors
    from jaxckpt.weights.hf import export_hf
    from jaxckpt.weights.pretrained import load_params, resolve_checkpoint_path
