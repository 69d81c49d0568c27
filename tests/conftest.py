"""What every test shares."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _cache_of_their_own(tmp_path_factory):
    """The tests' measured run times are kept apart from the user's cache (qwt_onnx.cache)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QWT_ONNX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
