"""A drafter-pool replica loads the target's tokenizer only (no weights): same identity and vocabulary."""

from __future__ import annotations

import pytest

from actors.model_cache import ModelError
from actors.models import load_model, load_tokenizer
from deploy.config import ServeConfig
from deploy.pool import DrafterPool


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2:3"])
def test_tokenizer_only_matches_the_loaded_model(spec):
    full, light = load_model(spec), load_tokenizer(spec)
    assert light.identity == full.identity
    assert light.vocab_size == full.vocab_size == full.model.config.vocab_size
    assert light.kernels == full.kernels  # the cost curve a drafter picks is the verifier's
    assert not hasattr(light, "model")


def test_tokenizer_only_from_a_hugging_face_dir(tmp_path):
    full = load_model("tiny-llama:2", kernels="torch")
    full.model.config.vocab_size = 320  # a head wider than the tokenizer: ids up to 319 are valid
    full.model.save_pretrained(tmp_path)
    full.tokenizer.save_pretrained(tmp_path)
    light = load_tokenizer(str(tmp_path))
    assert light.identity == full.identity and light.vocab_size == 320


def test_tokenizer_only_refuses_what_load_model_refuses(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        load_tokenizer(str(tmp_path / "nothing"))
    with pytest.raises(ModelError, match="seed"):
        load_tokenizer("tiny-llama:x")


def test_pool_loads_no_target_weights(monkeypatch):
    import deploy.pool

    loaded: list[str] = []
    monkeypatch.setattr(deploy.pool, "load_model", lambda spec, **kw: loaded.append(spec) or load_model(spec, **kw))
    cfg = ServeConfig(model="tiny-llama", draft_model="tiny-llama:1", torch_threads=1).model_dump(mode="json")
    assert set(DrafterPool(cfg, "trigram").info()) == {"aded"}
    assert set(DrafterPool(cfg, "aux").info()) == {"sd", "mtad", "mmtad"}
    assert loaded == ["tiny-llama:1"]  # the auxiliary draft model only, never the target
