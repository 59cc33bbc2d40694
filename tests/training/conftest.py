import pytest

from tests.training.helpers import make_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """Prefix of a small .bin/.idx corpus (a dozen standard-library files, builtin:tiny)."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))
