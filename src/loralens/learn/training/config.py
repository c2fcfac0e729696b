"""What to train: :class:`TrainConfig`, every setting checked when it is made, before a store is
read."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from loralens.errors import SettingsError
from loralens.learn.fitting.rowfilter import compile_filter
from loralens.learn.fitting.tasks import CLASSIFICATION, REGRESSION
from loralens.learn.trust import conformal as cp
from loralens.learn.trust.calibrate import INTERVALS
from loralens.models.linear_base import KINDS as LINEAR_BASES
from loralens.models.registry import (
    TRAINING_SCHEMA,
    check_hparams,
    check_training,
    training_defaults,
)

#: How a run's models read LoRAs (see ``TrainConfig.basis``).
BASES = ("auto", "none")


@dataclass
class TrainConfig:
    """What to train. ``None`` means the model's default (``models.registry.training_defaults``)."""

    model: str
    targets: list[str]
    seed: int = 0
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    patience: int | None = None
    grad_clip: float | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    #: filter selecting the rows used at all, e.g. "rank == 4" (see learn.rowfilter)
    where: str | None = None
    #: split fractions when the store has no ``split`` column
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    #: name of a column with train/val/test values; "auto" uses ``split`` when present
    split_column: str | None = "auto"
    #: force a task kind ("regression"/"classification"); default: inferred from labels
    task: str | None = None
    plots: bool = True
    #: torch CPU threads (None: torch's default). 1 is fastest for small models on a busy CPU.
    threads: int | None = None
    #: cross-validation folds: None chooses (data.CV_FOLDS below data.CV_BELOW labelled LoRAs,
    #: else one split); 1 always one train/val/test split; k >= 2 always k folds
    folds: int | None = None
    #: also fit the linear probes (learn.probes) on the same split(s)
    probes: bool = True
    #: the model's linear base (models.linear_base), fitted on the training rows before the
    #: network learns what it misses: "auto" = "dense" where the training LoRAs' ΔW fit in
    #: probes.DENSE_MAX_BYTES, else "spectral"; "none" = the network alone
    linear_base: str = "auto"
    #: how the models read LoRAs: "auto" through a basis of the directions the training
    #: updates use (models.basis: the same quality and cost at any layer width), "none" the
    #: factors as they are
    basis: str = "auto"
    #: calibration (learn.trust): share of the labelled LoRAs held out of the one split's
    #: training rows to calibrate on (cross-validated runs: out of fold); 0: no calibration
    calibration: float = 0.1
    #: coverage of intervals / prediction sets; "normalized" or "plain" intervals
    coverage: float = 0.9
    interval: str = "normalized"
    #: share of in-distribution calibration LoRAs the fit check flags
    ood_share: float = 0.05

    def __post_init__(self) -> None:
        """Refuse a setting of the wrong type or out of range now, before any store is read:
        an unknown model or hyperparameter, a width of 1e7, a filter outside the language."""
        check_hparams(self.model, self.hparams)
        check_training({k: getattr(self, k) for k in TRAINING_SCHEMA})
        targets = self.targets
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
            raise SettingsError(
                f"targets must be a non-empty list of column names, got {targets!r}"
            )
        if self.task not in (None, REGRESSION, CLASSIFICATION):
            raise SettingsError(
                f"task must be {REGRESSION!r} or {CLASSIFICATION!r}, got {self.task!r}"
            )
        f = self.fractions
        if not (
            len(f) == 3
            and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in f)
            and sum(f) <= 1 + 1e-9
        ):
            raise SettingsError(
                f"fractions must be three numbers in [0, 1] summing to at most 1, got {f!r}"
            )
        if self.folds is not None and (
            not isinstance(self.folds, numbers.Integral)
            or isinstance(self.folds, bool)
            or not 1 <= self.folds <= 100
        ):
            raise SettingsError(f"folds must be an integer in [1, 100], got {self.folds!r}")
        for key in ("seed", "threads"):
            v = getattr(self, key)
            if v is not None and (
                not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < (key == "threads")
            ):
                raise SettingsError(
                    f"{key} must be a non-negative integer (threads: >= 1), got {v!r}"
                )
        if self.where:
            compile_filter(self.where)
        if self.basis not in BASES:
            raise SettingsError(f"basis must be one of {list(BASES)}, got {self.basis!r}")
        if self.linear_base not in ("auto", *LINEAR_BASES):
            raise SettingsError(
                f"linear_base must be one of {['auto', *LINEAR_BASES]}, got {self.linear_base!r}"
            )
        _check_trust_settings(self)

    def resolved(self) -> dict[str, Any]:
        """The training settings used: the model's defaults, overridden where set here."""
        d = training_defaults(self.model)
        for k in d:
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


def _check_trust_settings(config: TrainConfig) -> None:
    """Refuse calibration settings of a TrainConfig out of range (ValueError naming them)."""
    c = config.calibration
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < 0.5:
        raise SettingsError(f"calibration must be a share in [0, 0.5), got {c!r}")
    cp.check_level(config.coverage)
    cp.check_level(config.ood_share, "ood_share")
    if config.interval not in INTERVALS:
        raise SettingsError(f"interval must be one of {INTERVALS}, got {config.interval!r}")


__all__ = ["TrainConfig"]
