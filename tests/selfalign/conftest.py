"""The `make train` model for the selfalign tests: `starcoder demo`'s path, 2 steps on 8 files,
built once per session."""

import pytest
import torch

from starcoder.cli import main


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--output-dir", str(out), "--steps", "2", "--max-files", "8",
                     "--threads", "1", "--set", "log.progress_bar=false"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "run"
