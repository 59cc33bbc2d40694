"""Session-wide test settings, applied before any test module imports Triton or torch threads."""

import os
import shutil
import subprocess

import pytest

# Without a GPU, Triton kernels run under the interpreter. Triton reads this when a kernel is
# decorated, so it must be set before starcoder.kernels is first imported (`make test` sets it too;
# this makes a bare `pytest` behave the same).
if "TRITON_INTERPRET" not in os.environ:
    has_gpu = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    if not has_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def one_thread():
    """Pin torch's thread count for tests that compare results bit for bit across processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Initialised tiny-sc1 (MQA, learned positions) and tiny-sc2 (GQA, RoPE, sliding window 64)
    models, built once per test session, each as a native model folder ("native") and its
    Hugging Face export ("hf"), with the builtin tiny tokenizer. Weights are drawn with a larger
    std than training uses so greedy decoding has clear winners (no near-ties between backends)."""
    from tests.models import write_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {name: write_tiny_model(root / name, preset) for name, preset in
            (("sc1", "tiny-sc1"), ("sc2", "tiny-sc2"))}


@pytest.fixture(scope="session")
def sandbox():
    """The bubblewrap sandbox `starcoder eval` and `selfalign` run generated code in, or a skip
    saying why it is missing."""
    from starcoder.eval.sandbox import Sandbox, SandboxUnavailable

    box = Sandbox()
    try:
        box.check()
    except SandboxUnavailable as err:
        pytest.skip(f"no working bubblewrap sandbox here ({err}); `make test` installs it as root")
    return box
