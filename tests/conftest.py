from dataclasses import dataclass

import pytest
import torch

from actors.models import LoadedModel, load_model
from actors.process import free_port

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning threads make every
# forward several times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    """The tiny target most engine tests decode with (module scope: a module may mutate its caches)."""
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def aux() -> LoadedModel:
    """An auxiliary draft model for ``target``: same byte tokenizer, other random weights."""
    return load_model("tiny-llama:1")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M from the cache (the first run on a machine converts it from GGUF, ~30 s)."""
    return load_model("smollm2-135m")


@dataclass(frozen=True)
class ServeNode:
    grpc_port: int
    http_port: int
    metrics_port: int  # the node's Prometheus endpoint (a Ray setting, not part of ServeConfig)


# What the session's apps ask for. test_serving's app fills draft_pool / verify_pool exactly (its pool test
# checks that nothing is left over; one verify_pool slot is for its SmolLM2 app); test_faults' app asks for
# pools of its own, so neither sees the other's replicas.
NODE_RESOURCES = {"draft_pool": 3, "verify_pool": 2, "faults_draft_pool": 2, "faults_verify_pool": 1}


@pytest.fixture(scope="session")
def serve_node():
    """One local Ray + Serve per test session (a driver holds one cluster): modules deploy their apps onto it
    and delete them when they are done."""
    pytest.importorskip("ray")
    from deploy import local
    from deploy.config import DeploymentOptions, ServeConfig

    node = ServeNode(free_port(), free_port(), free_port())
    bare = ServeConfig(grpc_port=node.grpc_port, http_port=node.http_port, trigram_placement="colocated",
                       verifier=DeploymentOptions(resources={}))  # asks for no pool: NODE_RESOURCES are all
    local.start(bare, extra_resources=NODE_RESOURCES, metrics_port=node.metrics_port)
    try:
        yield node
    finally:
        local.stop()
