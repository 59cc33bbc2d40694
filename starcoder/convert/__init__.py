"""Checkpoint formats: sharded safetensors, native model folders, Hugging Face mapping."""
