"""The KubeRay manifests (k8s/): rendered from the overlays' ServeConfig, valid for Kubernetes, the
KubeRay v1.7.0 CRD and Ray Serve, and consistent with the Serve config's pools, ports and health check.
Offline: no cluster, no kubectl."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from deploy import k8s
from deploy.config import GRPC_SERVICERS, ServeConfig, load_config, render_serve_config
from deploy.ingress import SERVICES
from specd.cli import main

ROOT = Path(__file__).resolve().parent.parent
CRD_ENV = "SPECD_KUBERAY_CRD"
CRD_DEFAULT = ROOT / "k8s" / "schemas" / "kuberay-v1.7.0-rayservices.crd.json"  # vendored: a bare clone checks it
K8S_VERSION = "1.35.0"
OVERLAYS = pytest.mark.parametrize("overlay", k8s.OVERLAYS)


def rendered(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((k8s.K8S_DIR / "rendered" / f"{overlay}.yaml").read_text()) if d]


def rayservice(overlay: str) -> dict:
    (rs,) = [o for o in rendered(overlay) if o["kind"] == "RayService"]
    return rs


def groups(rs: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def containers(rs: dict) -> list[dict]:
    spec = rs["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for p in pods for c in p["spec"]["containers"]]


# ---- one source of truth ----

@OVERLAYS
def test_committed_manifests_equal_the_rendered_ones(overlay, tmp_path):
    copy_root = tmp_path / "k8s"
    for sub in ("base", f"overlays/{overlay}"):
        for f in (k8s.K8S_DIR / sub).iterdir():
            if f.name != "rayservice.yaml":
                (copy_root / sub).mkdir(parents=True, exist_ok=True)
                (copy_root / sub / f.name).write_text(f.read_text())
    for path in k8s.render(copy_root, (overlay,)):
        committed = k8s.K8S_DIR / path.relative_to(copy_root)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `specd k8s render`"


@OVERLAYS
def test_rendered_file_is_what_kustomize_composes(overlay):
    assert rendered(overlay) == k8s.kustomize_objects(k8s.K8S_DIR / "overlays" / overlay)
    kinds = sorted(o["kind"] for o in rendered(overlay))
    assert kinds.count("RayService") == 1 and kinds.count("Service") == 3 and "StatefulSet" in kinds


def test_kustomizations_use_only_what_the_renderer_composes(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches:\n  - path: p.yaml\n")
    with pytest.raises(ValueError, match="only 'resources'"):
        k8s.kustomize_objects(tmp_path)


@OVERLAYS
def test_serve_config_v2_is_what_specd_serve_runs(overlay, capsys):
    config = k8s.K8S_DIR / "overlays" / overlay / "serve-config.yaml"
    v2 = yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])
    assert v2 == render_serve_config(load_config(config))
    assert main(["serve", "--config", str(config), "--print-serve-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == v2


def test_cli_renders_an_overlay(monkeypatch):
    calls = []
    monkeypatch.setattr(k8s, "render", lambda overlays: calls.append(overlays) or [])
    assert main(["k8s", "render", "--overlay", "dev"]) == 0
    assert calls == [("dev",)]


# ---- validity ----

@OVERLAYS
def test_core_objects_pass_kubernetes_validate_strict(overlay):
    objs = [o for o in rendered(overlay) if o["kind"] != "RayService"]
    spec = rayservice(overlay)["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    # The RayService's pod templates are core objects too: probes, env and resources checked strictly.
    objs += [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": t}
             for i, t in enumerate(templates)]
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _no_unknown_fields(schema):
    """The CRD schema with unknown fields rejected (the API server would silently prune them)."""
    if isinstance(schema, dict):
        schema = {k: _no_unknown_fields(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_no_unknown_fields(v) for v in schema]
    return schema


def load_rayservice_schema(path: Path) -> dict:
    if not path.is_file():
        where = "in CI" if os.environ.get("CI") else "locally"
        pytest.fail(f"KubeRay RayService CRD not found at {path} ({where}); set {CRD_ENV} to its JSON copy",
                    pytrace=False)
    crd = json.loads(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert crd["spec"]["names"]["kind"] == "RayService" and v1["served"]
    return _no_unknown_fields(v1["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    return load_rayservice_schema(Path(os.environ.get(CRD_ENV, CRD_DEFAULT)))


def test_a_missing_crd_fails_instead_of_skipping(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="CRD not found"):
        load_rayservice_schema(tmp_path / "missing.json")


@OVERLAYS
def test_rayservice_validates_against_the_kuberay_crd(overlay, rayservice_schema):
    rs = rayservice(overlay)
    assert rs["apiVersion"] == "ray.io/v1"
    jsonschema.validate(rs, rayservice_schema)


def test_crd_check_catches_a_misspelt_field(rayservice_schema):
    rs = copy.deepcopy(rayservice("dev"))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rs, rayservice_schema)


@OVERLAYS
def test_serve_config_v2_validates_with_ray(overlay):
    v2 = yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(v2) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(v2)
    (app,) = v2["applications"]
    for d in app["deployments"]:
        assert "num_replicas" not in d, d["name"]
        AutoscalingConfig(**d["autoscaling_config"])


# ---- consistency with the Serve config ----

def pool_problems(cfg: ServeConfig, rs: dict) -> list[str]:
    """Where the worker groups cannot hold the deployments: pool names, sizes, GPUs, CPUs."""
    spec = rs["spec"]["rayClusterConfig"]
    problems = []
    if "resources" in spec["headGroupSpec"]["rayStartParams"] or spec["headGroupSpec"]["rayStartParams"].get(
            "num-cpus") != "0":
        problems.append("the head offers pools or CPUs to replicas")
    offered = {}
    for name, g in groups(rs).items():
        pools = k8s.parse_pools_param(g["rayStartParams"]["resources"])
        if len(pools) != 1:
            problems.append(f"group {name} offers {pools}, not one pool")
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        for pool, per_pod in pools.items():
            offered[pool] = (name, per_pod, g, float(limits["cpu"]), int(limits.get(k8s.GPU, 0)))
    need: dict[str, list] = {}
    for name, opts in cfg.deployments.items():
        for pool, amount in opts.resources.items():
            need.setdefault(pool, []).append((name, amount, opts))
    if set(need) != set(offered):
        problems.append(f"Serve pools {sorted(need)} != worker-group pools {sorted(offered)}")
    for pool, users in need.items():
        if pool not in offered:
            continue
        group, per_pod, g, cpus, gpus = offered[pool]
        units = sum(a * (o.autoscaling_config or {}).get("max_replicas", o.num_replicas) for _, a, o in users)
        if units > per_pod * g["maxReplicas"]:
            problems.append(f"{pool}: {units} units at max scale > {per_pod} x {g['maxReplicas']} pods")
        gpu_need = sum(o.num_gpus * (o.autoscaling_config or {}).get("max_replicas", o.num_replicas)
                       for _, _, o in users)
        if gpu_need > gpus * g["maxReplicas"]:
            problems.append(f"{pool}: {gpu_need} GPUs at max scale > {gpus} x {g['maxReplicas']} pods")
        for name, amount, o in users:
            if amount > per_pod or o.num_gpus > gpus or o.num_cpus > cpus:
                problems.append(f"{name} does not fit one {group} pod")
    return problems


@OVERLAYS
def test_worker_group_pools_match_the_serve_config(overlay):
    cfg, _ = k8s.load_overlay(overlay)
    rs = rayservice(overlay)
    assert pool_problems(cfg, rs) == []
    assert {n: k8s.parse_pools_param(g["rayStartParams"]["resources"]) for n, g in groups(rs).items()}.keys() == \
        {"draft", "verify"}


def test_pool_check_breaks_when_they_drift():
    cfg, _ = k8s.load_overlay("prod")
    rs = copy.deepcopy(rayservice("prod"))
    g = groups(rs)
    assert pool_problems(cfg.model_copy(update={"verifier": cfg.verifier.model_copy(
        update={"resources": {"verify_gpu_pool": 1}})}), rs)
    g["draft"]["maxReplicas"] = 1
    assert any("draft_pool" in p for p in pool_problems(cfg, rs))
    g["draft"]["rayStartParams"]["resources"] = k8s.pools_param({"verify_pool": 4})
    assert pool_problems(cfg, rs)


@OVERLAYS
def test_ports_probes_and_redis_follow_the_serve_config(overlay):
    cfg, _ = k8s.load_overlay(overlay)
    objs = {(o["kind"], o["metadata"]["name"]): o for o in rendered(overlay)}
    assert objs["Service", "specd-grpc"]["spec"]["ports"][0]["targetPort"] == cfg.grpc_port
    assert objs["Service", "specd-http"]["spec"]["ports"][0]["targetPort"] == cfg.http_port
    for svc in ("specd-grpc", "specd-http"):
        assert objs["Service", svc]["spec"]["type"] == "LoadBalancer"
    rs = rayservice(overlay)
    v2 = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert v2["grpc_options"]["port"] == cfg.grpc_port and v2["http_options"]["host"] == "0.0.0.0"
    assert "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" in GRPC_SERVICERS
    for g in groups(rs).values():
        probe = g["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]
        assert probe["port"] == cfg.grpc_port and probe.get("service", "") in SERVICES
    assert cfg.redis_url_env
    for c in containers(rs):
        env = {e["name"]: e for e in c["env"]}
        assert re.fullmatch(r"redis://:\$\(REDIS_PASSWORD\)@specd-redis:6379/0", env[cfg.redis_url_env]["value"])
        assert list(env).index("REDIS_PASSWORD") < list(env).index(cfg.redis_url_env)  # $(VAR) needs it first


def test_dev_is_cpu_only_and_prod_pins_gpu_pools():
    dev, prod = rayservice("dev"), rayservice("prod")
    assert k8s.GPU not in json.dumps(dev)
    assert k8s.load_overlay("dev")[0].model == "smollm2-135m"
    cfg = k8s.load_overlay("prod")[0]
    assert (cfg.model, cfg.draft_model) == ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
    for name, g in groups(prod).items():
        pod = g["template"]["spec"]
        assert pod["nodeSelector"]["specd.dev/pool"] == name
        assert {"key": k8s.GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        res = pod["containers"][0]["resources"]
        assert res["limits"][k8s.GPU] == res["requests"][k8s.GPU] == "1"
    assert k8s.GPU not in json.dumps(prod["spec"]["rayClusterConfig"]["headGroupSpec"])
    for rs in (dev, prod):
        assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    pdbs = [o for o in rendered("prod") if o["kind"] == "PodDisruptionBudget"]
    assert {p["spec"]["selector"]["matchLabels"]["specd/group"] for p in pdbs} == {"draft", "verify"}
    for p in pdbs:
        group = groups(prod)[p["spec"]["selector"]["matchLabels"]["specd/group"]]
        assert p["spec"]["minAvailable"] < group["minReplicas"]  # a drain can always evict one pod


def test_image_pins_the_project_torch_and_ray():
    import ray

    dockerfile = (k8s.K8S_DIR / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}\n" in dockerfile
    assert f"rayproject/ray:{ray.__version__}-py311-cpu" in dockerfile
    for overlay in k8s.OVERLAYS:
        assert rayservice(overlay)["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
