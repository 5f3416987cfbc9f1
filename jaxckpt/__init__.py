"""jaxckpt: pure-functional JAX training with pretrained grafts, checkpoint retention and exact resume."""

from jaxckpt import distributed
from jaxckpt.checkpoint import CheckpointManager
from jaxckpt.errors import UserError
from jaxckpt.foreign import graft_foreign
from jaxckpt.foreign import read_foreign
from jaxckpt.foreign import write_safetensors
from jaxckpt.graft import GraftEntry
from jaxckpt.graft import GraftReport
from jaxckpt.graft import graft
from jaxckpt.graft import plan
from jaxckpt.loop import NonFiniteLossError
from jaxckpt.loop import evaluate
from jaxckpt.loop import predict
from jaxckpt.loop import run
from jaxckpt.loop import run_or_exit
from jaxckpt.loop import train_and_evaluate
from jaxckpt.optim import describe_trainable
from jaxckpt.optim import freeze_and_scale
from jaxckpt.optim import make_optimizer
from jaxckpt.optim import make_schedule
from jaxckpt.pathmatch import label_tree
from jaxckpt.pathmatch import match
from jaxckpt.preemption import PREEMPTED_EXIT_CODE
from jaxckpt.preemption import Preempted
from jaxckpt.pretrained import load_params
from jaxckpt.pretrained import resolve_checkpoint_path
from jaxckpt.retention import RetentionPolicy
from jaxckpt.state import TrainState
from jaxckpt.step import make_eval_step
from jaxckpt.step import make_predict_step
from jaxckpt.step import make_train_step
from jaxckpt.step import mean_metrics
from jaxckpt.step import sum_metrics
from jaxckpt.stepdir import CheckpointCorruptError
from jaxckpt.stepdir import CheckpointNotFoundError
from jaxckpt.stepdir import CheckpointSaveError
from jaxckpt.task import Task
from jaxckpt.task import load_task
from jaxckpt.treepath import flatten
from jaxckpt.treepath import unflatten
from jaxckpt.treepath import unflatten_dict
from jaxckpt.workdir import WorkdirError
from jaxckpt.workdir import WorkdirLock

__version__ = "0.1.0"

__all__ = (
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "GraftEntry",
    "GraftReport",
    "NonFiniteLossError",
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "RetentionPolicy",
    "Task",
    "TrainState",
    "UserError",
    "WorkdirError",
    "WorkdirLock",
    "describe_trainable",
    "distributed",
    "evaluate",
    "flatten",
    "freeze_and_scale",
    "graft",
    "graft_foreign",
    "label_tree",
    "load_params",
    "load_task",
    "make_eval_step",
    "make_optimizer",
    "make_predict_step",
    "make_schedule",
    "make_train_step",
    "match",
    "mean_metrics",
    "plan",
    "predict",
    "read_foreign",
    "resolve_checkpoint_path",
    "run",
    "run_or_exit",
    "sum_metrics",
    "train_and_evaluate",
    "unflatten",
    "unflatten_dict",
    "write_safetensors",
)
