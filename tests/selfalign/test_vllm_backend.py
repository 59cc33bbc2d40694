"""The vLLM backend of `starcoder selfalign`: a one-line UserError where vLLM is missing; where it
is installed (GPU clusters), real generation from the tiny models, native and Hugging Face."""

import importlib.machinery
import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest

from starcoder.config import UserError
from starcoder.selfalign.vllm_backend import NOT_INSTALLED, VLLMBackend, request_seed

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (GPU clusters only)")
PROMPTS = ["def add(a, b):\n    return", "class Stack:\n    def push(self, item):\n        self."]


def test_missing_vllm_is_one_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec answers None: as if not installed
    with pytest.raises(UserError) as err:
        VLLMBackend(tmp_path)
    assert str(err.value) == NOT_INSTALLED and "\n" not in NOT_INSTALLED


def test_request_seeds_differ_by_prompt_and_sample_not_by_batch():
    seeds = {request_seed(0, p, k) for p in PROMPTS for k in range(4)}
    assert len(seeds) == 8 and request_seed(0, PROMPTS[0], 1) == request_seed(0, PROMPTS[0], 1)
    assert request_seed(1, PROMPTS[0], 1) not in seeds


def fake_vllm(calls: dict) -> types.ModuleType:
    """A stand-in `vllm` module: LLM records its arguments and answers each request with a text
    naming its prompt and seed, so the backend's plumbing runs on a machine without vLLM."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs
            self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=256))

        def get_tokenizer(self):
            return SimpleNamespace(encode=lambda text: text.split())

        def generate(self, prompts, params, use_tqdm):
            calls["params"] = params
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f"{p}|{sp.seed}", token_ids=[0] * len(p))])
                    for p, sp in zip(prompts, params)]

    module.LLM, module.SamplingParams = LLM, lambda **kwargs: SimpleNamespace(**kwargs)
    return module


def test_backend_exports_native_folders_and_groups_samples_by_prompt(monkeypatch, tiny_models, tmp_path):
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    backend = VLLMBackend(tiny_models["sc2"]["native"], dtype="bfloat16", tensor_parallel=2,
                          export_dir=tmp_path / "hf")
    assert calls["llm"]["model"] == str(tmp_path / "hf") and (tmp_path / "hf" / "config.json").is_file()
    assert (calls["llm"]["dtype"], calls["llm"]["tensor_parallel_size"]) == ("bfloat16", 2)
    assert backend.context == 256 and backend.count_tokens(["a b", "c"]) == [2, 1]
    out = backend.generate(PROMPTS, samples=3, max_new_tokens=5, temperature=0.7, top_p=0.9,
                           seed=4, stop=["\n### "])
    assert [[o.text for o in row] for row in out] == [
        [f"{p}|{request_seed(4, p, k)}" for k in range(3)] for p in PROMPTS]
    assert [o.tokens for o in out[1]] == [len(PROMPTS[1])] * 3
    assert {(sp.n, sp.max_tokens, sp.temperature, sp.top_p, tuple(sp.stop)) for sp in calls["params"]} == {
        (1, 5, 0.7, 0.9, ("\n### ",))}
    # A Hugging Face folder goes to vLLM as it is.
    VLLMBackend(tiny_models["sc1"]["hf"])
    assert calls["llm"]["model"] == str(tiny_models["sc1"]["hf"])


@needs_vllm
def test_vllm_generates_from_native_and_hf_folders(tiny_models, tmp_path):
    from starcoder.data.tokenizer import load_tokenizer
    from starcoder.generation import load_generator

    native = tiny_models["sc2"]["native"]
    # Two engines in one process: each takes a small share of the GPU.
    backend = VLLMBackend(native, dtype="float32", export_dir=tmp_path / "hf", gpu_memory=0.2)
    assert (tmp_path / "hf" / "config.json").is_file()
    assert backend.context == tiny_models["sc2"]["config"].model.max_position_embeddings
    tokenizer = load_tokenizer("builtin:tiny")
    assert backend.count_tokens(PROMPTS) == [len(tokenizer.encode(p)) for p in PROMPTS]

    # Greedy: the native generator's text, token for token.
    greedy = backend.generate(PROMPTS, samples=1, max_new_tokens=12, temperature=0.0, top_p=1.0,
                              seed=0, stop=[])
    ours = load_generator(native).complete(PROMPTS, max_new_tokens=12)
    assert [[o.text] for o in ours] == [[g.text for g in row] for row in greedy]
    assert [[len(o.tokens)] for o in ours] == [[g.tokens for g in row] for row in greedy]

    # Sampling: samples x prompts, cut before the stop, repeatable for a seed, varied across samples.
    args = dict(samples=4, max_new_tokens=24, temperature=1.0, top_p=1.0, stop=["\n"])
    first = backend.generate(PROMPTS, seed=3, **args)
    assert [len(row) for row in first] == [4, 4]
    assert all("\n" not in o.text and 0 < o.tokens <= 24 for row in first for o in row)
    assert backend.generate(PROMPTS, seed=3, **args) == first
    assert backend.generate(PROMPTS[::-1], seed=3, **args) == first[::-1]  # order does not matter
    assert any(len({o.text for o in row}) > 1 for row in first)

    # A Hugging Face folder is read as it is.
    hf = VLLMBackend(tiny_models["sc1"]["hf"], dtype="float32", gpu_memory=0.2)
    assert hf.model_dir == tiny_models["sc1"]["hf"]
    assert len(hf.generate(PROMPTS[:1], samples=2, max_new_tokens=8, temperature=0.8, top_p=0.95,
                           seed=0, stop=[])[0]) == 2
