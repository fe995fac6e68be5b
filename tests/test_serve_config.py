"""ServeConfig validation and the rendered `serve run` / serveConfigV2 config (no Ray cluster needed)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

pytest.importorskip("ray")
from ray.serve.config import AutoscalingConfig  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from deploy.config import DeploymentOptions, ServeConfig, load_config, render_serve_config  # noqa: E402

AUTOSCALE = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}


def test_every_field_has_a_description():
    for model in (ServeConfig, DeploymentOptions):
        missing = [name for name, f in model.model_fields.items() if not f.description]
        assert not missing, f"{model.__name__}: {missing}"


def test_autoscaling_config_validates():
    opts = DeploymentOptions(autoscaling_config=AUTOSCALE, resources={"draft_pool": 1})
    assert "num_replicas" not in opts.serve_options()
    AutoscalingConfig(**opts.serve_options()["autoscaling_config"])
    with pytest.raises(ValidationError):
        DeploymentOptions(autoscaling_config={"min_replicas": 3, "max_replicas": 1})
    with pytest.raises(ValidationError):
        DeploymentOptions(autoscaling_config={"max_replicas": 2, "no_such_knob": 1})


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError):
        ServeConfig(modle="tiny-llama")
    with pytest.raises(ValidationError):
        DeploymentOptions(replicas=2)


@pytest.mark.parametrize("placement", ["remote", "colocated"])
def test_rendered_config_validates_with_serve_schema(placement):
    cfg = ServeConfig(draft_model="tiny-llama:1", trigram_placement=placement,
                      trigram_drafter=DeploymentOptions(autoscaling_config=AUTOSCALE, resources={"draft_pool": 1}))
    rendered = render_serve_config(cfg)
    ServeDeploySchema.model_validate(rendered) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(rendered)
    app = rendered["applications"][0]
    names = [d["name"] for d in app["deployments"]]
    assert names == ["Ingress", "Verifier"] + (["TrigramDrafter"] if placement == "remote" else []) + ["AuxDrafter"]
    for d in app["deployments"]:
        if "autoscaling_config" in d:
            AutoscalingConfig(**d["autoscaling_config"])
    # The args round-trip into the same config: the builder and `serve run` see exactly this object.
    assert ServeConfig.model_validate(app["args"]) == cfg


def test_pool_sizes_count_replicas_at_their_largest():
    cfg = ServeConfig(draft_model="tiny-llama:1",
                      trigram_drafter=DeploymentOptions(autoscaling_config=AUTOSCALE, resources={"draft_pool": 1}),
                      aux_drafter=DeploymentOptions(num_replicas=2, resources={"draft_pool": 0.5}))
    assert cfg.pool_sizes() == {"verify_pool": 1, "draft_pool": 4 + 1}


def test_load_config_file_with_overrides(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "grpc_port": 9100}))
    cfg = load_config(path, grpc_port=None, default_method="ar")
    assert (cfg.model, cfg.grpc_port, cfg.default_method) == ("tiny-llama", 9100, "ar")


def test_affinity_router_is_stable_and_moves_only_lost_keys():
    from deploy.routing import rendezvous_order

    replicas = ["r1", "r2", "r3"]
    owner = {k: replicas[rendezvous_order(k, replicas)[0]] for k in (f"req-{i}" for i in range(300))}
    assert owner == {k: replicas[rendezvous_order(k, replicas)[0]] for k in owner}  # deterministic
    assert set(owner.values()) == set(replicas)  # spread over every replica
    fewer = ["r1", "r3"]
    moved = {k for k in owner if fewer[rendezvous_order(k, fewer)[0]] != owner[k]}
    assert moved == {k for k, r in owner.items() if r == "r2"}  # only r2's requests move


def test_batch_invariance_reaches_the_engine_and_a_tp_group_refuses_to_drop_it():
    assert ServeConfig().engine_config().batch_invariant
    assert not ServeConfig(batch_invariant=False).engine_config().batch_invariant
    assert ServeConfig().engine_config().budget_timing
    assert not ServeConfig(budget_timing=False).engine_config().budget_timing
    with pytest.raises(ValidationError, match="plain backend"):  # at load time, not at a replica's start
        ServeConfig(batch_invariant=False, tp_size=2)


def test_ports_for_servers_are_drawn_below_the_ephemeral_range_and_bind():
    """A port picked by binding port 0 is an ephemeral one that another process's outgoing connection may
    take before the server binds it (a Serve proxy failed on "[::]:34141" that way)."""
    import socket

    from actors.process import _binds, _ephemeral_low, free_port

    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(p < low for p in ports)
    with socket.create_server(("127.0.0.1", free_port())) as taken:
        port = taken.getsockname()[1]
        assert not _binds("", port) and not _binds("127.0.0.1", port)
    assert _binds("", port)  # free again
