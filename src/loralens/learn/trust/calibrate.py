"""Calibrating a trained run (:mod:`loralens.learn.trust.calibration`): the model's outputs,
embeddings and update sizes over store rows; the calibration fitted from them on rows no part
of the model was fitted on; the out-of-fold outputs of a model whose linear base was refitted
on the rows to calibrate on (CV+); and the cross-conformal test report. Which rows each kind of
run calibrates on is :mod:`loralens.learn.training.calibrating`'s choice.
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
) -> Calibration:
    """Fit the fit check on ``reference_rows`` (the training LoRAs) and calibrate on
    ``cal_rows`` with their raw outputs ``cal_raw`` (None: the model predicts them), which
    must come from no fit that saw those rows: held-out rows, outputs out of fold
    (:func:`base_out_of_fold`), or, with folds ``groups``, the cross-validated folds' outputs
    (cross-conformal: each fold's fit scores are taken against a reference of the other folds).
    ``method`` names which (``calibration.METHODS``). The fit check's thresholds pool the
    calibration LoRAs' scores with the reference LoRAs' scored out of fold (OOF_FOLDS); a
    calibration LoRA in the reference gets its out-of-fold scores."""
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
    cal_raw = raw if cal_raw is None else np.asarray(cal_raw)
    span = span_fit.held_out(cal_rows, cal_in.span)
    if groups is None:
        ood, size = fit.scores(cal_in.embed), np.abs(fit.size_residuals(cal_in))
        ref_ood, ref_size = out_of_fold_scores(ref_in, folds, names)
        ref_span = span_fit.held_out(ref, ref_in.span)
        at = np.searchsorted(ref, cal_rows).clip(max=max(len(ref) - 1, 0))
        in_ref = ref[at] == cal_rows  # scored out of fold above
        ood[in_ref], size[in_ref] = ref_ood[at[in_ref]], ref_size[at[in_ref]]
        out = ~in_ref
        fit.calibrate(
            np.r_[ood[out], ref_ood], np.r_[size[out], ref_size], np.r_[span[out], ref_span], share
        )
    else:  # the refit saw every LoRA: each fold is scored against a reference of the others
        ood, size = out_of_fold_scores(cal_in, groups, names)
        fit.calibrate(ood, size, span, share)
    finite = ood[np.isfinite(ood)]
    offset = float(np.median(finite)) if len(finite) else 1.0
    y = y_all[cal_rows]
    baseline = np.abs(y - np.asarray(task.mean))
    if task.kind == CLASSIFICATION:
        temp = np.array(
            [cp.choose_temperature(cal_raw[:, j], y[:, j], seed) for j in range(y.shape[1])]
        )
        scores = cp.set_scores(cp.calibrated(cal_raw, temp), y)
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
    model: Any,
    store: LoRAStore,
    task: Task,
    y_all: np.ndarray,
    fitted: np.ndarray,
    held: np.ndarray,
    raw: np.ndarray,
    seed: int,
) -> np.ndarray:
    """(len(held), out) raw outputs of ``model`` on store rows ``held`` (``raw`` as it gives
    them) with its linear base, fitted on the sorted rows ``fitted`` (``held`` among them),
    refitted without each of OOF_FOLDS seeded folds of ``held`` and applied to that fold: the
    outputs on rows that no part of the model was fitted on, when the rest of it (the network,
    or nothing for a model that is its base alone) never trained on ``held`` (CV+)."""
    xs = base_features(store, model, fitted)
    y = task.encode(y_all[fitted])
    base = model.linear_base
    delta = base.kind == "update" and bool(base.delta)
    weight, bias = base.weight.double().cpu().numpy(), base.bias.double().cpu().numpy()
    at = np.searchsorted(fitted, held)
    out = np.asarray(raw, dtype=np.float64) - (xs[delta][at] @ weight + bias)
    folds = np.random.default_rng(seed).permutation(np.arange(len(held)) % OOF_FOLDS)
    for g in range(OOF_FOLDS):
        m = folds == g
        if not m.any():
            continue
        keep = np.ones(len(fitted), dtype=bool)
        keep[at[m]] = False
        fit = fit_base(model, task, y[keep], {d: x[keep] for d, x in xs.items()})
        out[m] += fit.predict({d: x[at[m]] for d, x in xs.items()})
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
    inside = cal.scores <= q
    rep: dict[str, Any] = {"level": level, "n": n, "cross_fitted": True}
    rep["coverage"] = float(np.mean(inside[ok]))
    rep["per_target"] = [
        {"coverage": float(np.mean(inside[ok[:, j], j])), "n": int(ok[:, j].sum())}
        for j in range(t)
    ]
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
    rep["problems"] = cp.coverage_problems(rep, cal.targets)
    return rep


__all__ = [
    "INTERVALS",
    "OOF_FOLDS",
    "base_only",
    "base_out_of_fold",
    "calibrate",
    "cross_report",
    "outputs",
    "store_outputs",
    "unit_dim",
    "unit_kind",
]
