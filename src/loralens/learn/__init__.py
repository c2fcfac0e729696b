"""Learning on a packed store: what to predict (tasks), from which rows (data), the training
loop, run directories and inference (runs), plots, the quality benchmark and the demo."""

from loralens.learn.benchmark import run_benchmark
from loralens.learn.loop import TrainConfig, train
from loralens.learn.runs import Run, evaluate, load_run, predict
from loralens.learn.tasks import Task

__all__ = [
    "Run",
    "Task",
    "TrainConfig",
    "evaluate",
    "load_run",
    "predict",
    "run_benchmark",
    "train",
]
