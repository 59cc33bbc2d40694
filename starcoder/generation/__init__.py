"""Inference in our own model: a KV cache, prefill and decode, sampling and stop sequences."""

from starcoder.generation.cache import KVCache, kv_bytes_per_token
from starcoder.generation.generate import Completion, Generator, cut_at_stop, generate_ids
from starcoder.generation.load import load_generator
from starcoder.generation.sampling import Sampling

__all__ = ["Completion", "Generator", "KVCache", "Sampling", "cut_at_stop", "generate_ids",
           "kv_bytes_per_token", "load_generator"]
