"""loralens: learning on LoRAs. Read LoRA adapters as data, predict properties of the finetuned model."""

from loralens.lora import LayerSpec, LoRA, LoRABatch, LoRALayer, collate

__version__ = "0.1.0"

__all__ = [
    "LayerSpec",
    "LoRA",
    "LoRABatch",
    "LoRALayer",
    "__version__",
    "collate",
]
