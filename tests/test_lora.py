"""The core data model: layers, LoRAs, batches and exact zero-padding of ranks."""

import pytest
import torch

import loralens as ll
from helpers import random_lora


def _lora(ranks, shapes=((6, 5), (4, 7)), seed=0):
    return random_lora(ranks, shapes, seed, dtype=torch.float32, scale=1.0)


def test_delta_weights_is_U_times_V_transpose():
    lora = _lora([2, 3])
    for layer in lora.layers:
        assert torch.allclose(lora.delta_weights()[layer.name], layer.U @ layer.V.T)
        assert lora.delta_weights()[layer.name].shape == layer.shape


def test_collate_zero_pads_mixed_ranks_without_changing_any_delta():
    a, b = _lora([1, 3], seed=1), _lora([4, 2], seed=2)
    batch = ll.collate([a, b])
    assert [u.shape[2] for u in batch.U] == [4, 3]
    assert batch.ranks.tolist() == [[1, 3], [4, 2]]
    deltas = batch.delta_weights()
    for k, lora in enumerate([a, b]):
        for i, layer in enumerate(lora.layers):
            assert torch.allclose(deltas[i][k], layer.delta_weight())
    back = batch.unbatch()
    assert back[0].ranks == [1, 3] and torch.equal(back[0].layers[0].U, a.layers[0].U)


def test_collate_refuses_different_layers_and_lists_them():
    a = _lora([2, 2])
    b = _lora([2, 2], shapes=((6, 5), (4, 8)))
    with pytest.raises(ValueError, match=r"l1: \(4, 8\) != \(4, 7\)"):
        ll.collate([a, b])


def test_layer_rejects_factors_with_different_ranks():
    with pytest.raises(ValueError, match="disagree on the rank"):
        ll.LoRALayer("x", torch.zeros(3, 2), torch.zeros(4, 3))
