"""Learning on a packed store: what to predict (tasks), from which rows (data), the training
loop, run directories and inference (runs), calibrated intervals and the fit check (trust),
plots, the quality benchmark and the demo."""

from loralens.learn.benchmark import run_benchmark
from loralens.learn.fitcheck import FitCheck, LayoutError
from loralens.learn.loop import TrainConfig, train
from loralens.learn.predict import predict_adapters
from loralens.learn.runs import Run, evaluate, load_run, predict
from loralens.learn.tasks import Task
from loralens.learn.trust import Calibration

__all__ = [
    "Calibration",
    "FitCheck",
    "LayoutError",
    "Run",
    "Task",
    "TrainConfig",
    "evaluate",
    "load_run",
    "predict",
    "predict_adapters",
    "run_benchmark",
    "train",
]
