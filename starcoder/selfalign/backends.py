"""Generation backends for the model-driven stages: `native` (our model, batched generation with
the KV cache of `starcoder.generation`) and `vllm` (vLLM, when installed, for GPU clusters).
Both take text prompts and give `samples` outputs per prompt, deterministic for a seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starcoder.selfalign.report import progress_bar

BACKENDS = ("native", "vllm")


@dataclass
class Output:
    text: str  # the new text, cut before the first stop sequence
    tokens: int  # new tokens generated


class NativeBackend:
    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto", batch_size: int = 8):
        import torch

        from starcoder.generation import load_generator

        if dtype == "auto":  # bf16 where the hardware has it natively; CPU matmuls want fp32
            dtype = "float32" if torch.device(device).type == "cpu" else "bfloat16"
        self.generator = load_generator(model, device, getattr(torch, dtype))
        self.context = self.generator.context
        self.batch_size = batch_size

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.generator.tokenizer.encode_batch(texts)]

    def generate(self, prompts: list[str], samples: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, stop: list[str]) -> list[list[Output]]:
        from starcoder.generation import Sampling

        # Samples of one prompt are rows of the same batches: the generator draws every row's
        # next token from one seeded stream, so repeats give different samples.
        repeated = [p for p in prompts for _ in range(samples)]
        with progress_bar(len(repeated), "generating") as bar:
            done = self.generator.complete(repeated, max_new_tokens, Sampling(temperature, top_p, 0, seed),
                                           stop, batch_size=self.batch_size, progress=bar.update)
        outputs = [Output(c.text, len(c.tokens)) for c in done]
        return [outputs[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def load_backend(kind: str, model: str, device: str, dtype: str, batch_size: int,
                 tensor_parallel: int, export_dir: Path):
    if kind == "native":
        return NativeBackend(model, device, dtype, batch_size)
    from starcoder.selfalign.vllm_backend import VLLMBackend
    return VLLMBackend(model, dtype=dtype, tensor_parallel=tensor_parallel, export_dir=export_dir)
