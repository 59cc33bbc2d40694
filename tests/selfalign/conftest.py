import pytest

from starcoder.eval.sandbox import Sandbox, SandboxUnavailable


@pytest.fixture(scope="session")
def sandbox():
    box = Sandbox()
    try:
        box.check()
    except SandboxUnavailable as err:
        pytest.skip(f"no working bubblewrap sandbox here ({err}); `make test` installs it as root")
    return box
