"""LoL models: ``mlp``, ``mlp-oalign``, ``mlp-svd``, ``mlp-dense``, ``glnet``, ``w2t`` (see ``build_model``)."""

from loralens.models.base import HParamError, LoLModel, ModelSizeError, RunningStandardize
from loralens.models.glnet import EquivariantLinear, GLNet, GLNonlinearity
from loralens.models.mlp import SVDMLP, DenseMLP, FlatMLP, OAlignMLP
from loralens.models.registry import MODEL_NAMES, build_model, example_batch, model_cost
from loralens.models.w2t import W2T

__all__ = [
    "MODEL_NAMES",
    "SVDMLP",
    "W2T",
    "DenseMLP",
    "EquivariantLinear",
    "FlatMLP",
    "GLNet",
    "GLNonlinearity",
    "HParamError",
    "LoLModel",
    "ModelSizeError",
    "OAlignMLP",
    "RunningStandardize",
    "build_model",
    "example_batch",
    "model_cost",
]
