"""`specd serve` does the slow one-time work in the foreground, before Ray starts, and says what it starts."""

from actors.aded.corpus import default_matrix_path
from actors.models import load_model
from deploy import local
from deploy.config import ServeConfig
from specd.cli import main


def test_prepare_builds_the_trigram_matrix_before_any_replica(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECD_CACHE_DIR", str(tmp_path))
    cfg = ServeConfig(model="tiny-llama")
    path = default_matrix_path(load_model("tiny-llama").identity)
    assert str(path).startswith(str(tmp_path)) and not path.exists()
    local.prepare(cfg, print)
    assert path.exists()  # built in this process: no Ray here
    assert "tri-gram matrix" in capsys.readouterr().err


def test_serve_refuses_an_unfetched_large_model_before_starting_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECD_CACHE_DIR", str(tmp_path))
    code = main(["serve", "--model", "qwen2.5-coder-1.5b"])
    err = capsys.readouterr().err
    assert code == 2 and "specd models fetch qwen2.5-coder-1.5b" in err and "Traceback" not in err
    assert "starting Ray" not in err


def test_describe_names_every_deployment_it_starts():
    line = local.describe(ServeConfig(draft_model="tiny-llama:1", aux_placement="remote"), 2)
    for name in ("Ingress", "Verifier", "TrigramDrafter", "AuxDrafter", "verify_pool", "draft_pool", ":9000"):
        assert name in line
    assert "TrigramDrafter" not in local.describe(ServeConfig(trigram_placement="colocated"), 2)
