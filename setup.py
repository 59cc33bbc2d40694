"""Package build. The C++ data helpers in csrc/ are built here as a pybind11 extension."""

from setuptools import find_packages, setup

setup(
    name="starcoder",
    version="0.1.0",
    description="Pretraining stack for StarCoder / StarCoder2 code LLMs",
    python_requires=">=3.10",
    packages=find_packages(include=["starcoder", "starcoder.*"]),
    package_data={"starcoder": ["assets/**/*"]},
    install_requires=[
        # 2.11 is what the GPU machines carry, 2.13 the CPU wheel here.
        "torch>=2.6",
        "numpy>=1.26",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tqdm>=4.66",
    ],
    extras_require={
        "hf": ["transformers>=4.50"],
        "data": ["pyarrow>=14", "zstandard>=0.22", "sentencepiece>=0.2"],
        "log": ["tensorboard>=2.15", "wandb"],
    },
    entry_points={"console_scripts": ["starcoder = starcoder.cli:main"]},
)
