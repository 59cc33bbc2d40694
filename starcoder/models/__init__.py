"""Model definition: one GPT for StarCoder and StarCoder2, its attention seam and init."""

from starcoder.models.gpt import GPT
from starcoder.models.init import init_weights

__all__ = ["GPT", "init_weights"]
