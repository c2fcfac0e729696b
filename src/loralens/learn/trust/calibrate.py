"""Calibrating a trained run (:mod:`loralens.learn.trust.calibration`): the model's outputs, embeddings and
update sizes over store rows, the calibration fitted from them, and its report on the test
split, all in one place so that ``train`` calls one function.

``split`` runs hold a share of the training split out (``TrainConfig.calibration``, seeded,
stratified by class) before training (a split read from a store column is kept: its ``cal``
rows calibrate, or failing those its validation rows, ``val``); cross-validated runs calibrate
on the out-of-fold outputs (cross-conformal) and report each fold judged by the other folds'
quantiles and threshold. A ``split`` run whose model is its linear base alone (early stopping
chose epoch 0) also calibrates on the base's out-of-fold residuals over the rows it was fitted
on (``split+cv``, CV+): 20 held-out scores give a 90% quantile that varies by ±6 points of
coverage from one draw to the next, 180 by about ±2.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loralens.learn.fitting.base_fit import base_features, fit_base
from loralens.learn.fitting.tasks import CLASSIFICATION, Task
from loralens.learn.trust import conformal as cp
from loralens.learn.trust.calibration import MAX_REFERENCE, Calibration
from loralens.learn.trust.fitcheck import FitCheck, FitInputs, out_of_fold_scores
from loralens.learn.trust.span import Span, SpanFit
from loralens.lora import LoRABatch
from loralens.models.base import layer_rms, log_scale
from loralens.models.linear_base import spectral_width, unit_features

#: Kinds of regression interval: scaled by each LoRA's difficulty, or one width for all.
INTERVALS = ("normalized", "plain")
#: Folds in which the training LoRAs are scored out of fold, to calibrate the fit check's
#: thresholds on them as well as on the calibration LoRAs (a 95% quantile of 20 scores is their
#: largest; of 20 + the training LoRAs, a real quantile).
OOF_FOLDS = 5

if TYPE_CHECKING:
    from loralens.store import LoRAStore


# ---------------------------------------------------------------------------------- fitting


def unit_kind(model: Any) -> str:
    """The scale-free features the fit check's size model reads: ΔW over its norm where the
    model's linear base reads ΔW (so it fits in memory), else normalized singular values."""
    base = getattr(model, "linear_base", None)
    return "dense" if base is not None and base.kind in ("dense", "update") else "spectral"


def unit_dim(model: Any) -> int:
    """Length of the scale-free features :func:`outputs` gives for ``model``'s layout."""
    spec = model.inner
    if unit_kind(model) == "dense":
        return sum(int(o) * int(i) for o, i in spec.shapes)
    return len(spec.names) * spectral_width(spec)


@torch.no_grad()
def outputs(
    model: Any, batches: Iterable[LoRABatch], span: Span | None = None
) -> tuple[np.ndarray, FitInputs]:
    """(raw outputs (N, out), what the fit check reads) of ``model`` over ``batches``: the
    embedding from the same forward pass, per-layer log RMS of delta W (as given, not
    projected: energy outside the model's basis counts), scale-free features of what the model
    reads, and the span_score against ``span`` (zeros without)."""
    model.eval()
    kind, k = unit_kind(model), spectral_width(model.inner)
    raws, embs, rms, units, spans = [], [], [], [], []
    for batch in batches:
        spans.append(np.zeros(len(batch)) if span is None else span.scores(batch))
        rms.append(log_scale(layer_rms(model.check(batch))).double().cpu().numpy())
        inner = model.prepare(batch)
        with model.given_prepared():
            z = model.embed(inner)
            raws.append(model.output(inner, z).double().cpu().numpy())
        embs.append(z.double().cpu().numpy())
        units.append(unit_features(inner, kind, k).cpu().numpy())
    if not raws:
        empty = np.zeros((0, 0))
        return np.zeros((0, model.out_dim)), FitInputs(
            empty, np.zeros((0, len(model.spec.names))), empty, np.zeros(0)
        )
    return np.concatenate(raws), FitInputs(
        np.concatenate(embs), np.concatenate(rms), np.concatenate(units), np.concatenate(spans)
    )


def store_outputs(
    model: Any, store: LoRAStore, rows: np.ndarray, batch_size: int = 256, span: Span | None = None
) -> tuple[np.ndarray, FitInputs]:
    """:func:`outputs` over store ``rows`` (padded to the model's ranks), in row order."""
    pad = [int(r) for r in model.spec.ranks]
    batches = (b for _, b in store.iter_batches(batch_size, rows=rows, pad_ranks=pad))
    return outputs(model, batches, span)


def calibrate(
    model: Any,
    store: LoRAStore,
    task: Task,
    y_all: np.ndarray,
    *,
    reference_rows: np.ndarray,
    cal_rows: np.ndarray,
    cal_raw: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    method: str = "split",
    coverage: float = cp.COVERAGE,
    share: float = 0.05,
    normalized: bool = True,
    seed: int = 0,
    pooled: tuple[np.ndarray, np.ndarray] | None = None,
) -> Calibration:
    """Fit the fit check on ``reference_rows`` (the training LoRAs) and calibrate on
    ``cal_rows``: held out (``cal_raw`` None: the model predicts them), or out-of-fold outputs
    ``cal_raw`` of rows among the reference, in folds ``groups`` (cross-conformal: each fold's
    fit scores are taken against a reference of the other folds). ``method`` names a held-out
    calibration: "split", or "val" (validation rows, also used to stop early: a little optimistic).
    The fit check's thresholds also pool the reference LoRAs scored out of fold (OOF_FOLDS).
    ``pooled``: (rows, raw outputs) of more LoRAs predicted out of fold (:func:`base_out_of_fold`)
    whose residuals join the calibration LoRAs' (method "split+cv")."""
    names = list(model.spec.names)
    rng = np.random.default_rng(seed)
    ref = np.sort(np.asarray(reference_rows))
    if len(ref) > MAX_REFERENCE:
        ref = np.sort(rng.choice(ref, MAX_REFERENCE, replace=False))
    cal_rows = np.asarray(cal_rows)
    method = method if groups is None else "cross"
    if groups is None:
        folds = rng.permutation(np.arange(len(ref)) % OOF_FOLDS)
    else:  # each reference row in the fold it is held out in (one more fold: those in none)
        fold_of = dict(zip(cal_rows.tolist(), np.asarray(groups).tolist()))
        folds = np.array([fold_of.get(r, -1) for r in ref.tolist()])
    span_fit = SpanFit.of(model, store, ref, folds, seed)
    _, ref_in = store_outputs(model, store, ref, span=span_fit.span)
    fit = FitCheck.fit(ref_in, names)
    fit.span = span_fit.span
    raw, cal_in = store_outputs(model, store, cal_rows, span=span_fit.span)
    cal_raw = raw if cal_raw is None else cal_raw
    span = span_fit.held_out(cal_rows, cal_in.span)
    if groups is None:
        ood, size = fit.scores(cal_in.embed), np.abs(fit.size_residuals(cal_in))
        ref_ood, ref_size = out_of_fold_scores(ref_in, folds, names)
        ref_span = span_fit.held_out(ref, ref_in.span)
        fit.calibrate(np.r_[ood, ref_ood], np.r_[size, ref_size], np.r_[span, ref_span], share)
        if pooled is not None:
            p_rows, p_raw = pooled
            at = np.searchsorted(ref, p_rows).clip(max=len(ref) - 1)
            in_ref = ref[at] == p_rows  # scored out of fold above
            p_ood, p_size, p_span = (np.empty(len(p_rows)) for _ in range(3))
            p_ood[in_ref], p_size[in_ref] = ref_ood[at[in_ref]], ref_size[at[in_ref]]
            p_span[in_ref] = ref_span[at[in_ref]]
            if not in_ref.all():  # the others (validation rows) against the whole reference
                _, p_in = store_outputs(model, store, p_rows[~in_ref], span=span_fit.span)
                p_ood[~in_ref] = fit.scores(p_in.embed)
                p_size[~in_ref] = np.abs(fit.size_residuals(p_in))
                p_span[~in_ref] = p_in.span
    else:  # the refit saw every LoRA: each fold is scored against a reference of the others
        ood, size = out_of_fold_scores(cal_in, groups, names)
        fit.calibrate(ood, size, span, share)
    finite = ood[np.isfinite(ood)]
    offset = float(np.median(finite)) if len(finite) else 1.0
    baseline = np.abs(y_all[cal_rows] - np.asarray(task.mean))
    if groups is None and pooled is not None:
        method = "split+cv"
        cal_rows, cal_raw = np.r_[cal_rows, p_rows], np.r_[cal_raw, p_raw]
        ood, size, span = np.r_[ood, p_ood], np.r_[size, p_size], np.r_[span, p_span]
    y = y_all[cal_rows]
    if task.kind == CLASSIFICATION:
        temp = np.array([cp.fit_temperature(cal_raw[:, j], y[:, j]) for j in range(y.shape[1])])
        scores = cp.set_scores(cp.sigmoid(cal_raw / temp), y)
    else:
        temp = np.ones(y.shape[1])
        diff = offset + ood if normalized else np.ones(len(ood))
        scores = np.abs(y - task.decode(cal_raw)) / diff[:, None]
    return Calibration(
        task.kind,
        list(task.targets),
        cp.check_level(coverage),
        method,
        bool(normalized) and task.kind != CLASSIFICATION,
        scores,
        baseline,
        temp,
        offset,
        fit,
        ood,
        size,
        span,
    )


def base_only(model: Any) -> bool:
    """Whether ``model`` predicts with its linear base alone (early stopping chose epoch 0)."""
    return getattr(model, "linear_base", None) is not None and float(model.gate.detach()) == 0.0


def base_out_of_fold(
    model: Any, store: LoRAStore, task: Task, y_all: np.ndarray, rows: np.ndarray, seed: int
) -> np.ndarray:
    """(len(rows), out) raw outputs of the model's linear base refitted without each of
    OOF_FOLDS seeded folds of ``rows`` (the rows it was fitted on), on that fold: the residuals
    of a model that is its base alone, out of fold (CV+), to calibrate on beside the held-out
    LoRAs."""
    xs = base_features(store, model, rows)
    y = task.encode(y_all[rows])
    folds = np.random.default_rng(seed).permutation(np.arange(len(rows)) % OOF_FOLDS)
    out = np.zeros((len(rows), task.out_dim))
    for g in range(OOF_FOLDS):
        m = folds == g
        fit = fit_base(model, task, y[~m], {d: x[~m] for d, x in xs.items()})
        out[m] = fit.predict({d: x[m] for d, x in xs.items()})
    return out


def cross_report(cal: Calibration, task: Task, y: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """The test report of a cross-conformal calibration: the LoRAs of each fold judged by the
    quantiles and fit-check thresholds of the other folds' scores, pooled."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    level = cal.coverage
    n, t = cal.scores.shape
    q = np.full((n, t), np.inf)
    flagged = np.zeros(n, dtype=bool)
    for g in np.unique(groups):
        m = groups == g
        q[m] = [cp.conformal_quantile(s, level) for s in cal.scores[~m].T]
        for score, alpha in zip((cal.ood, cal.size, cal.span), cal.fit.shares()):
            if alpha > 0:
                flagged[m] |= score[m] > cp.conformal_quantile(score[~m], 1.0 - alpha)
    ok = ~np.isnan(y)
    rep: dict[str, Any] = {"level": level, "n": n, "cross_fitted": True}
    rep["coverage"] = float(np.mean((cal.scores <= q)[ok]))
    if task.kind == CLASSIFICATION:
        true = 1.0 - cal.scores  # probability of the true class
        p1 = np.where(y >= 0.5, true, 1.0 - true)
        sizes = (1.0 - p1 <= q).astype(int) + (p1 <= q).astype(int)
        rep["set_size"] = float(np.mean(sizes[ok]))
        rep["ece"] = float(np.nanmean([cp.ece(p1[ok[:, j], j], y[ok[:, j], j]) for j in range(t)]))
    else:
        width = 2.0 * q * cal.difficulty(cal.ood)[:, None]
        std = np.asarray(task.std)
        rep["width_rel_std"] = float(
            np.mean([np.mean(width[ok[:, j], j]) / std[j] for j in range(t)])
        )
        qb = np.array([cp.conformal_quantile(s, level) for s in cal.baseline.T])
        rep["width_no_weights_rel_std"] = float(np.mean(2 * qb / std))
    rep["flagged"] = float(np.mean(flagged))
    rep["ood_score_mean"] = float(np.mean(cal.ood))
    return rep


__all__ = [
    "INTERVALS",
    "OOF_FOLDS",
    "calibrate",
    "cross_report",
    "outputs",
    "store_outputs",
    "unit_dim",
    "unit_kind",
]
