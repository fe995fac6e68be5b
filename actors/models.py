"""Load models by short name: tiny random models, SmolLM2-135M, the Qwen2.5-Coder 0.5B/1.5B pair.

A spec is a registered name (``actors.model_cache.REGISTRY``: tiny models are built in code, the others
are converted into the cache on first use), a local Hugging Face directory or a ``.gguf`` file. Besides
loading, this is the one place a prompt becomes token ids (``encode_prompt``) and a tokenizer gets the
identity that namespaces shared n-gram statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from actors.kernels import Kernels, apply_kernels, kernels_of, onednn_available
from actors.model_cache import REGISTRY, ModelError, cached_dir, load_gguf
from actors.tiny import tiny_model, tiny_tokenizer

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: PreTrainedModel  # eval mode, on CPU
    tokenizer: PreTrainedTokenizerBase
    name: str  # the spec it was loaded from
    identity: str  # tokenizer fingerprint: namespaces shared n-gram statistics

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def vocab_size(self) -> int:
        """Rows of the output head (may exceed the tokenizer's size): every valid token id is below it."""
        return int(self.model.config.vocab_size)

    @property
    def kernels(self) -> str:
        """The linear kernels the model runs (its measured cost curve belongs to them)."""
        return kernels_of(self.model)

    @property
    def device_type(self) -> str:
        return self.model.device.type

    @property
    def dtype_name(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def eos_ids(self) -> set[int]:
        """Every id that ends a turn: the tokenizer's eos plus the (generation) config's, each int or list."""
        ids: set[int] = set()
        for value in (
            self.tokenizer.eos_token_id,
            getattr(self.model.generation_config, "eos_token_id", None),
            getattr(self.model.config, "eos_token_id", None),
        ):
            if value is not None:
                ids.update([value] if isinstance(value, int) else value)
        return ids

    def encode(self, prompt: str | Sequence[dict], chat: bool) -> list[int]:
        """``prompt`` as token ids (see :func:`encode_prompt`)."""
        return encode_prompt(self.tokenizer, prompt, chat)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[dict], chat: bool) -> list[int]:
    """The one prompt encoding. Text is one user turn through the chat template (assistant turn opened) when
    ``chat``, else plain text with the tokenizer's special tokens; chat messages (``{"role", "content"}``
    dicts) always go through the template."""
    if isinstance(prompt, str) and not chat:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


@dataclass(frozen=True)
class TargetTokenizer:
    """What a drafter that runs no target forward needs of the target: no weights (a drafter-pool replica).

    ``kernels`` are those the target gets where it runs (a verifier on the CPU: ``load_model``'s ``auto``),
    so a drafter's cost curve is the verifier's.
    """

    tokenizer: PreTrainedTokenizerBase
    name: str
    identity: str
    vocab_size: int
    kernels: str
    device_type: str = "cpu"
    dtype_name: str = "float32"


def load_tokenizer(spec: str, *, cache_dir: str | os.PathLike | None = None, device_type: str = "cpu",
                   dtype: DtypeName = "auto") -> TargetTokenizer:
    """The tokenizer, identity and vocabulary size of ``spec`` (any ``load_model`` spec), without its weights.

    ``device_type`` / ``dtype``: where and how the verifier runs the target, so a drafter reads the verifier's
    cost curve (a CUDA target is never budgeted with a CPU curve).
    """
    name, _, seed = spec.partition(":")
    if name in REGISTRY and REGISTRY[name].gguf is None:
        _check_tiny_seed(spec, seed)
        tokenizer = tiny_tokenizer()
        vocab = len(tokenizer)  # a tiny model's head has exactly its tokenizer's size (actors.tiny)
    else:
        path, gguf = _tokenizer_source(spec, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path, **gguf)
        vocab = int(AutoConfig.from_pretrained(path, **gguf).vocab_size)
    torch_dtype = resolve_dtype(dtype, torch.device(device_type))
    # load_model's auto kernels: oneDNN for fp32 weights on the CPU
    kernels = "onednn" if device_type == "cpu" and torch_dtype == torch.float32 and onednn_available() else "torch"
    return TargetTokenizer(tokenizer, spec, tokenizer_identity(tokenizer), vocab, kernels, device_type,
                           str(torch_dtype).removeprefix("torch."))


def _tokenizer_source(spec: str, cache_dir: str | os.PathLike | None) -> tuple[Path, dict[str, str]]:
    """(directory, extra from_pretrained kwargs) holding ``spec``'s tokenizer and config; converts when needed."""
    if spec in REGISTRY:
        return cached_dir(spec, cache_dir), {}
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path, {}
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    raise _unknown(spec)


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """First 16 hex of sha256 over the sorted (token, id) pairs: equal vocabularies, equal identity."""
    pairs = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()[:16]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def load_model(
    spec: str,
    *,
    dtype: DtypeName | torch.dtype = "auto",
    cache_dir: str | os.PathLike | None = None,
    kernels: Kernels = "auto",
    device: str = "cpu",
) -> LoadedModel:
    """Load a registered name (``tiny-llama[:SEED]``, ``smollm2-135m``, ...), a local HF dir or a ``.gguf`` file.

    ``dtype``: ``auto`` = bfloat16 on CUDA, float32 on the CPU (whose fp32 kernels are the fast ones here).
    ``kernels``: see :mod:`actors.kernels` (``auto`` = oneDNN linears for an fp32 model on the CPU).
    ``device``: ``cpu``, ``cuda[:N]`` or ``auto`` (CUDA when this process sees a GPU). Tensor-parallel
    loading keeps ``cpu``: DeepSpeed moves each rank's shard itself.
    """
    target = resolve_device(device)
    loaded = _load(spec, resolve_dtype(dtype, target), cache_dir)
    if target.type != "cpu":
        loaded.model.to(target)
    apply_kernels(loaded.model, kernels)
    return loaded


def resolve_dtype(dtype: DtypeName | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"device {device!r}: {e}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r}: this process sees no CUDA GPU (use cpu or auto)")
    return resolved


def _load(spec: str, dtype: torch.dtype, cache_dir: str | os.PathLike | None) -> LoadedModel:
    name, _, seed = spec.partition(":")
    if name in REGISTRY and REGISTRY[name].gguf is None:
        _check_tiny_seed(spec, seed)
        model = tiny_model(name.removeprefix("tiny-"), seed=int(seed or 0)).to(dtype)
        return _loaded(model, tiny_tokenizer(), spec)
    if spec in REGISTRY:
        return _load_hf_dir(cached_dir(spec, cache_dir), spec, dtype)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_dir(path, spec, dtype)
    if path.is_file() and path.suffix == ".gguf":
        # Not cached: an arbitrary local file has no pinned hash to key a cache on; this is a slow path.
        tokenizer, model = load_gguf(path)
        return _loaded(model.to(dtype), tokenizer, spec)
    raise _unknown(spec)


def _unknown(spec: str) -> ModelError:
    return ModelError(
        f"unknown model {spec!r}: expected one of {', '.join(REGISTRY)} (tiny models take ':SEED'), "
        "a local Hugging Face directory with config.json, or a path to a .gguf file"
    )


def _check_tiny_seed(spec: str, seed: str) -> None:
    if seed and not seed.isdigit():
        raise ModelError(f"{spec!r}: the seed after ':' must be a non-negative integer")


def _loaded(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> LoadedModel:
    return LoadedModel(model.eval(), tokenizer, name, tokenizer_identity(tokenizer))


def _load_hf_dir(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return _loaded(model, tokenizer, name)


