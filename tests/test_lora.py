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


def test_pad_to_pads_with_exact_zeros_and_keeps_gl_invariant_features():
    from loralens.features import svals

    batch = ll.collate([_lora([1, 3], seed=1), _lora([2, 2], seed=2)])
    padded = batch.pad_to([5, 3])
    assert [u.shape[2] for u in padded.U] == [5, 3] and torch.equal(padded.ranks, batch.ranks)
    for a, b in zip(padded.U + padded.V, batch.U + batch.V):
        r = b.shape[2]
        assert torch.equal(a[:, :, :r], b)
        assert torch.equal(a[:, :, r:], torch.zeros_like(a[:, :, r:]))  # exact zeros
        assert a.mT.is_contiguous()  # rank-major, like collate's
    assert padded.U[1] is batch.U[1]  # a layer already that wide is not copied
    for a, b in zip(padded.delta_weights(), batch.delta_weights()):
        assert torch.equal(a, b)
    k = 5  # the singular values of U V^T do not see padding columns
    torch.testing.assert_close(svals(padded, k), svals(batch, k), rtol=1e-5, atol=1e-6)


def test_pad_to_never_truncates():
    batch = ll.collate([_lora([2, 3])])
    with pytest.raises(ValueError, match=r"l1: 2 < 3"):
        batch.pad_to([2, 2])
    with pytest.raises(ValueError, match="3 rank widths for 2 layers"):
        batch.pad_to([4, 4, 4])


def test_reprs_are_one_short_line():
    lora = _lora([2, 3])
    lora.metadata.update(format="peft", source="adapters/a1")
    assert repr(lora) == "LoRA(2 layers, ranks 2-3, float32, peft, source='adapters/a1')"
    assert repr(lora.layers[1]) == "LoRALayer('l1', 4x7, rank 3)"
    batch = ll.collate([lora, _lora([2, 2], seed=3)])
    assert repr(batch) == "LoRABatch(2 LoRAs, 2 layers, ranks 2-3, float32, cpu)"
