"""Generation with vLLM for GPU clusters, behind the native backend's interface. vLLM is optional
(`pip install starcoder[vllm]`) and imported only when this backend is built. vLLM reads Hugging
Face folders only, so a native model, run or checkpoint folder is exported to one first."""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from pathlib import Path

from starcoder.config import UserError
from starcoder.convert.export import to_hf
from starcoder.convert.weights import folder_kind, resolve_folder
from starcoder.selfalign.backends import Output

NOT_INSTALLED = ("--backend vllm: vLLM is not installed (pip install vllm, on a machine with a "
                 "CUDA GPU); use --backend native")


def request_seed(seed: int, prompt: str, sample: int) -> int:
    """The seed of one sample's request, from the run's seed, the prompt and the sample's index:
    a prompt's samples do not depend on which batch it is in or where, and no two requests share
    a random stream (vLLM gives each request of a batch exactly the seed it is handed)."""
    digest = hashlib.sha256(f"{seed}\0{sample}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any torch.Generator seed


class VLLMBackend:
    def __init__(self, model: str | Path, dtype: str = "auto", tensor_parallel: int = 1,
                 seed: int = 0, context: int | None = None, export_dir: str | Path | None = None,
                 gpu_memory: float = 0.9):
        """`model`: a native model, run or checkpoint folder (exported to Hugging Face format into
        `export_dir`, a temporary folder when None) or a Hugging Face folder. `context`: vLLM's
        max_model_len (None: the model's own). `gpu_memory`: the fraction of each GPU's memory
        vLLM takes for weights and KV cache, up front."""
        # find_spec, not try/import: a vLLM that is installed but fails to import says why itself.
        if importlib.util.find_spec("vllm") is None:
            raise UserError(NOT_INSTALLED)
        import vllm

        self._vllm = vllm
        self._export_tmp: tempfile.TemporaryDirectory | None = None  # removed with the backend
        self.model_dir = self._hf_folder(model, export_dir)
        self.llm = vllm.LLM(model=str(self.model_dir), dtype=dtype, tensor_parallel_size=tensor_parallel,
                            seed=seed, max_model_len=context, gpu_memory_utilization=gpu_memory)
        self.context: int = self.llm.llm_engine.model_config.max_model_len
        self.tokenizer = self.llm.get_tokenizer()

    def _hf_folder(self, model: str | Path, export_dir: str | Path | None) -> Path:
        folder = resolve_folder(model)
        if folder_kind(folder) == "hf":
            return folder
        if export_dir is None:
            self._export_tmp = tempfile.TemporaryDirectory(prefix="starcoder-vllm-")
            export_dir = Path(self._export_tmp.name) / "hf"
        return to_hf(folder, export_dir)

    def count_tokens(self, texts: list[str]) -> list[int]:
        # encode's default special tokens are what vLLM adds to a text prompt (none for StarCoder).
        return [len(self.tokenizer.encode(text)) for text in texts]

    def generate(self, prompts: list[str], samples: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, stop: list[str]) -> list[list[Output]]:
        """`samples` outputs per prompt. Each sample is its own request with n=1 and its own seed
        (request_seed), rather than one request with n=samples: the samples' streams then differ
        on every vLLM version, and prefix caching shares the prompt's (and few-shot prefix's) work."""
        requests = [(prompt, k) for prompt in prompts for k in range(samples)]
        params = [self._vllm.SamplingParams(n=1, temperature=temperature, top_p=top_p,
                                            max_tokens=max_new_tokens, stop=list(stop),
                                            seed=request_seed(seed, prompt, k))
                  for prompt, k in requests]
        results = self.llm.generate([prompt for prompt, _ in requests], params, use_tqdm=False)
        # vLLM leaves the stop string out of the text (include_stop_str_in_output=False).
        flat = [Output(r.outputs[0].text, len(r.outputs[0].token_ids)) for r in results]
        return [flat[i * samples:(i + 1) * samples] for i in range(len(prompts))]
