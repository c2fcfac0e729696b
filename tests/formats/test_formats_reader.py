"""Reading an adapter one layer at a time (``open_lora``): the layers, names, metadata and errors
of ``load_lora``, with names and shapes known from the header before any value is read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import loralens as ll
from helpers import peft_tensors, write_peft_adapter

H, MLP = 8, 32  # a tiny Flux


def _flux_kohya(path):
    """Fused BFL modules whose parts interleave with other layers in canonical order (qkv's
    to_q/to_k/to_v around proj's to_out.0), plus a module whose halves are swapped."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H),
        "lora_unet_double_blocks_0_img_attn_proj": (H, H),
        "lora_unet_single_blocks_1_linear1": (3 * H + MLP, H),
        "lora_unet_final_layer_adaLN_modulation_1": (2 * H, H),
    }
    sd = {}
    for module, (o, i) in shapes.items():
        sd[f"{module}.lora_down.weight"] = torch.randn(2, i, generator=g).half()
        sd[f"{module}.lora_up.weight"] = torch.randn(o, 2, generator=g).half()
        sd[f"{module}.alpha"] = torch.tensor(1.0)
    save_file(sd, path)
    return path


def _same_layers(a: ll.LoRALayer, b: ll.LoRALayer) -> None:
    assert a.name == b.name
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    assert a.meta.keys() == b.meta.keys()
    for key, value in a.meta.items():
        other = b.meta[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize("canonical", [True, False])
@pytest.mark.parametrize("kind", ["flux-kohya", "peft"])
def test_reading_one_layer_at_a_time_gives_load_loras_layers(tmp_path, kind, canonical):
    path = (
        _flux_kohya(tmp_path / "f.safetensors")
        if kind == "flux-kohya"
        else write_peft_adapter(tmp_path / "p")
    )
    whole = ll.load_lora(path, canonical=canonical)
    with ll.open_lora(path, canonical=canonical) as reader:
        assert reader.names == whole.names and reader.shapes == whole.shapes
        assert reader.metadata == whole.metadata and len(reader) == len(whole)
        layers = list(reader)
        again = next(iter(reader))  # every pass reads the file again
    assert len(layers) == len(whole.layers)
    for got, want in zip(layers, whole.layers):
        _same_layers(got, want)
    _same_layers(again, whole.layers[0])
    if kind == "flux-kohya" and canonical:
        assert whole.metadata["model_family"] == "flux"
        assert any(la.meta.get("file_rows") == "halves swapped" for la in layers)


def test_names_and_shapes_come_from_the_header_and_values_when_a_layer_is_read(tmp_path):
    """A NaN in the second layer: the reader opens, knows both layers, gives the first and
    refuses the second as it reads it, with load_lora's error."""
    tensors = peft_tensors()
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] = torch.nan
    path = write_peft_adapter(tmp_path / "p", tensors)
    with ll.open_lora(path) as reader:
        assert reader.names == [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
        ]
        assert reader.shapes == [(6, 8), (6, 8)]
        layers = iter(reader)
        assert next(layers).name == "model.layers.0.self_attn.q_proj"
        with pytest.raises(ll.LoRAFormatError) as streamed:
            next(layers)
    with pytest.raises(ll.LoRAFormatError) as whole:
        ll.load_lora(path)
    assert str(streamed.value) == str(whole.value)
    assert "model.layers.1.self_attn.q_proj" in str(whole.value) and "NaN" in str(whole.value)


def test_header_problems_are_refused_on_opening(tmp_path):
    tensors = peft_tensors()
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    path = write_peft_adapter(tmp_path / "p", tensors)
    with pytest.raises(ll.LoRAFormatError, match="unpaired key"):
        ll.open_lora(path)
