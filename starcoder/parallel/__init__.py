"""Parallelism kept apart from the model: the process grid and Megatron-style sharded layers."""
