"""Model definitions. One file per family; `model_type` in config.json picks it (no registry classes)."""
from qrun.models.llama import SUPPORTED, ModelArgs, Transformer

__all__ = ["SUPPORTED", "ModelArgs", "Transformer"]
