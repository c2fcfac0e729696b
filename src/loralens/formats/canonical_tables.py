"""The module-path grammars and renaming tables behind :mod:`loralens.formats.canonical`.

Canonical names are the module paths diffusers and transformers build (what PEFT's
``target_modules`` and diffusers' ``load_lora_weights`` address), prefixed by the pipeline
component for diffusion pipelines (``unet.``, ``text_encoder.``, ``text_encoder_2.``,
``transformer.``). A grammar below is the set of module paths a LoRA can adapt in one model; a
renamed path counts as canonical only if it is in its component's grammar.
"""

from __future__ import annotations

import re

#: Names of module-path parts that hold underscores: kohya writes paths with every "." turned
#: into "_", and these are read back as one part (longest match first).
WORDS = frozenset(
    {
        # diffusers UNet2DConditionModel
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "time_emb_proj",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        # the original (SGM/LDM) UNet that kohya trains SDXL on
        "input_blocks",
        "middle_block",
        "output_blocks",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
        # CLIP and T5 text encoders (transformers)
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "text_projection",
        "wi_0",
        "wi_1",
        # Flux as Black Forest Labs ship it (kohya, ComfyUI, XLabs)
        "double_blocks",
        "single_blocks",
        "img_attn",
        "txt_attn",
        "img_mlp",
        "txt_mlp",
        "img_mod",
        "txt_mod",
        "img_in",
        "txt_in",
        "time_in",
        "vector_in",
        "guidance_in",
        "in_layer",
        "out_layer",
        "final_layer",
        "adaLN_modulation",
    }
)
#: Longest word in WORDS, in underscore-separated pieces.
MAX_WORD_PIECES = max(w.count("_") + 1 for w in WORDS)

_TRANSFORMER_BLOCK = (
    r"transformer_blocks\.\d+\.(?:attn[12]\.(?:to_[qkv]|to_out\.0)|ff\.net\.(?:0\.proj|2))"
)
_ATTENTIONS = rf"attentions\.\d+\.(?:proj_in|proj_out|{_TRANSFORMER_BLOCK})"
_RESNETS = r"resnets\.\d+\.(?:conv1|conv2|time_emb_proj|conv_shortcut)"
#: diffusers' UNet2DConditionModel (SD 1.x, SD 2.x, SDXL): the layers LoRA trainers adapt.
UNET = re.compile(
    rf"(?:(?:down|up)_blocks\.\d+\.(?:{_ATTENTIONS}|{_RESNETS}|(?:down|up)samplers\.0\.conv)"
    rf"|mid_block\.(?:{_ATTENTIONS}|{_RESNETS})"
    r"|conv_in|conv_out|(?:time_embedding|add_embedding)\.linear_[12])"
)
#: transformers' CLIPTextModel(WithProjection) and T5EncoderModel.
TEXT_ENCODER = re.compile(
    r"text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
    r"|text_projection"
    r"|encoder\.block\.\d+\.layer\.\d+\.(?:SelfAttention\.[qkvo]|DenseReluDense\.(?:wi_0|wi_1|wi|wo))"
)
#: diffusers' FluxTransformer2DModel.
FLUX = re.compile(
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
    r"|ff(?:_context)?\.net\.(?:0\.proj|2)|norm1(?:_context)?\.linear)"
    r"|single_transformer_blocks\.\d+\.(?:attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)"
    r"|x_embedder|context_embedder|proj_out|norm_out\.linear"
    r"|time_text_embed\.(?:timestep|text|guidance)_embedder\.linear_[12]"
)
#: Which grammar each pipeline component's paths follow.
COMPONENT_GRAMMARS = {
    "unet": UNET,
    "text_encoder": TEXT_ENCODER,
    "text_encoder_2": TEXT_ENCODER,
    "text_encoder_3": TEXT_ENCODER,
    "transformer": FLUX,
}
#: kohya's file-name prefixes of the text encoders -> diffusers' component.
KOHYA_TEXT_ENCODERS = {
    "te": "text_encoder",
    "te1": "text_encoder",
    "te2": "text_encoder_2",
    "te3": "text_encoder_3",
}
#: ComfyUI's text-encoder names -> diffusers' component (CLIP-G is SDXL's second encoder).
COMFYUI_TEXT_ENCODERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}

#: Modules inside an SGM UNet resnet block -> diffusers' ResnetBlock2D names.
SGM_RESNET = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
#: SGM UNet top-level modules -> diffusers'.
SGM_TOP = {
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
#: Resnets (and attentions) per down block of SD 1.x, SD 2.x and SDXL UNets (one more per up
#: block): SGM block numbers follow from it.
SGM_LAYERS_PER_BLOCK = 2

#: Flux modules as Black Forest Labs name them -> diffusers' FluxTransformer2DModel. Fused
#: modules are split by output rows into the parts listed, each part ``size`` rows, where a size
#: is "h" (the hidden size: the module's input width) or "rest" (what the others leave).
FLUX_DOUBLE = {
    "img_attn.qkv": (("attn.to_q", "h"), ("attn.to_k", "h"), ("attn.to_v", "h")),
    "txt_attn.qkv": (("attn.add_q_proj", "h"), ("attn.add_k_proj", "h"), ("attn.add_v_proj", "h")),
    "img_attn.proj": (("attn.to_out.0", "rest"),),
    "txt_attn.proj": (("attn.to_add_out", "rest"),),
    "img_mlp.0": (("ff.net.0.proj", "rest"),),
    "img_mlp.2": (("ff.net.2", "rest"),),
    "txt_mlp.0": (("ff_context.net.0.proj", "rest"),),
    "txt_mlp.2": (("ff_context.net.2", "rest"),),
    "img_mod.lin": (("norm1.linear", "rest"),),
    "txt_mod.lin": (("norm1_context.linear", "rest"),),
}
FLUX_SINGLE = {
    "linear1": (("attn.to_q", "h"), ("attn.to_k", "h"), ("attn.to_v", "h"), ("proj_mlp", "rest")),
    "linear2": (("proj_out", "rest"),),
    "modulation.lin": (("norm.linear", "rest"),),
}
FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
#: BFL's final modulation emits (shift, scale); diffusers' norm_out emits (scale, shift).
FLUX_SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}
#: XLabs' attention-processor LoRAs of double blocks -> the BFL module each one adapts.
XLABS_DOUBLE = {
    "qkv_lora1": "img_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora2": "txt_attn.proj",
}
#: XLabs' single-block ``qkv_lora`` is q, k and v only (BFL's linear1 holds the MLP too). Its
#: ``proj_lora`` is left unmapped: its input is the attention output alone, which no diffusers
#: module takes (single blocks' proj_out reads attention and MLP outputs together).
XLABS_SINGLE = {"qkv_lora": (("attn.to_q", "h"), ("attn.to_k", "h"), ("attn.to_v", "h"))}
