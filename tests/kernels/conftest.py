import pytest
import torch


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """With deterministic algorithms on, torch.empty fills floats with NaN: an output element a
    kernel forgot to write then fails the finiteness check in `checks.rel_error`."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)
