import pytest

from actors.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M from the cache (the first run on a machine converts it from GGUF, ~30 s)."""
    return load_model("smollm2-135m")
