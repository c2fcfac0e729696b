"""The digits presets' shared parts: a small text-to-image diffusion model on 8x8 digits.

``data`` (the image pool, attributes and prompts), ``model`` (UNet, prompt encoder, pretraining),
``sampling`` (DDIM with guidance), ``finetune`` (batched LoRA finetuning), ``scorer`` (the CLIP
analogue) and ``preset`` (:class:`~loralens.zoo.digits.preset.DigitsPreset`, the base of
``digits-dreambooth`` and ``digits-subsets``; ``zoo samples`` draws their images).
"""
