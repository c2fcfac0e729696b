"""Learning on a packed store, in packages whose imports point down:

- ``fitting``: what a model is fitted on and how (targets and tasks, rows and splits, the
  ``--where`` filter, linear probes and the linear base, the epochs with early stopping);
- ``trust``: how far a prediction can be trusted (conformal intervals and sets, the fit check,
  the span score, a run's calibration);
- ``runs``: the run folder (saving, ``load_run``, ``Run``, prediction, evaluation, reports);
- ``training``: ``train`` itself (one split or cross-validation, calibration, the run written);
- ``bench``: the models-by-targets benchmark and the demo.
"""

from loralens.learn.bench.benchmark import run_benchmark
from loralens.learn.fitting.tasks import Task
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.runs.folder import Run, load_run
from loralens.learn.runs.prediction import predict, predict_adapters
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.learn.trust.calibration import Calibration
from loralens.learn.trust.fitcheck import FitCheck, LayoutError

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
