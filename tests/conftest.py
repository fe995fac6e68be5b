import pytest
import torch

from actors.models import LoadedModel, load_model

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning threads make every
# forward several times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M from the cache (the first run on a machine converts it from GGUF, ~30 s)."""
    return load_model("smollm2-135m")
