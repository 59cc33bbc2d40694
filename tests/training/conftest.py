import pytest

from tests.training.helpers import make_corpus, make_sft_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """Prefix of a small .bin/.idx corpus (a dozen standard-library files, builtin:tiny)."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def sft_corpus(tmp_path_factory) -> str:
    """Prefix of a small instruct dataset with its loss mask (builtin:tiny)."""
    return make_sft_corpus(tmp_path_factory.mktemp("sft"))
