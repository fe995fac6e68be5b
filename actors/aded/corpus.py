"""Seed corpora for the tri-gram matrix, tokenised with the target's own tokenizer.

The default needs no download: Python's standard-library sources (code, docstrings, the pydoc topic
texts) and the package descriptions (``*.dist-info/METADATA``, markdown prose) already on the machine.
Text the target writes itself, from the generic prompts in ``actors.aded.prompts``, is the most
target-like corpus there is; the caller supplies generation through ``generate_fn(prompt) -> str``
and the answers are cached, so a rebuild never generates twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from actors.aded.prompts import CORPUS_PROMPTS
from actors.aded.trigram import TrigramMatrix, build_matrix

TEXT_SUFFIXES = {".py", ".md", ".txt", ".rst", ".pyi"}
_CHUNK_CHARS = 200_000  # tokenise long files in pieces: bounded memory, tokenizer batches stay parallel


def cache_dir() -> Path:
    """``$SPECD_CACHE_DIR`` if set, else the platform's user cache dir for specd."""
    env = os.environ.get("SPECD_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("specd"))


def _safe_name(identity: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", identity)[:60] or "model"
    return f"{stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def default_matrix_path(identity: str) -> Path:
    """Where the default matrix for a tokenizer/model identity lives."""
    return cache_dir() / "ngrams" / f"{_safe_name(identity)}.safetensors"


def generated_cache_path(identity: str) -> Path:
    return cache_dir() / "ngrams" / f"{_safe_name(identity)}.generated.jsonl"


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files (site-packages excluded), sorted for reproducibility."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def package_descriptions() -> list[Path]:
    """``METADATA`` files of installed distributions: their long descriptions are markdown prose."""
    roots = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    return sorted(p for r in roots if r.exists() for p in r.glob("*.dist-info/METADATA"))


def _jsonl_texts(path: Path) -> Iterator[str]:
    """Records with ``text``, or ``prompt`` + ``response``; other lines are skipped."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            if isinstance(rec.get("text"), str):
                yield rec["text"]
            elif isinstance(rec.get("response"), str):
                yield f"{rec.get('prompt', '')}\n{rec['response']}"


def iter_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Texts from files (.jsonl records; any other file as plain text) and directories (their text files)."""
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES | {".jsonl"})
            yield from iter_texts(files)
        elif p.suffix == ".jsonl":
            yield from _jsonl_texts(p)
        elif p.is_file():
            yield p.read_text(encoding="utf-8", errors="replace")


def tokenize_texts(tokenizer, texts: Iterable[str], batch_chars: int = 2_000_000) -> Iterator[np.ndarray]:
    """One int64 id array per text (long texts in ~200k-character pieces), no special tokens added."""
    batch, size = [], 0
    for text in texts:
        for i in range(0, len(text), _CHUNK_CHARS):
            piece = text[i: i + _CHUNK_CHARS]
            batch.append(piece)
            size += len(piece)
        if size >= batch_chars:
            yield from _encode(tokenizer, batch)
            batch, size = [], 0
    if batch:
        yield from _encode(tokenizer, batch)


def _encode(tokenizer, batch: list[str]) -> Iterator[np.ndarray]:
    for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
        yield np.asarray(ids, np.int64)


def generated_records(generate_fn: Callable[[str], str], cache_path: str | Path,
                      prompts: Sequence[str] = CORPUS_PROMPTS, progress: bool = True) -> list[dict]:
    """``{"prompt", "response"}`` for every prompt: cached ones read back, missing ones generated and appended."""
    cache_path = Path(cache_path)
    done = {}
    if cache_path.exists():
        for rec in map(json.loads, cache_path.read_text().splitlines()):
            done[rec["prompt"]] = rec
    missing = [p for p in prompts if p not in done]
    if missing:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with cache_path.open("a") as f:
            for prompt in tqdm(missing, desc="generating corpus", disable=not progress):
                rec = {"prompt": prompt, "response": generate_fn(prompt)}
                f.write(json.dumps(rec) + "\n")
                f.flush()  # an interrupted run resumes where it stopped
                done[prompt] = rec
    return [done[p] for p in prompts]


def chat_texts(tokenizer, records: Iterable[dict]) -> Iterator[str]:
    """Records rendered as the target sees them (its chat template), so the tri-grams that open an answer
    right after the template's assistant header are counted too."""
    for rec in records:
        if getattr(tokenizer, "chat_template", None):
            yield tokenizer.apply_chat_template(
                [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}],
                tokenize=False)
        else:
            yield f"{rec['prompt']}\n{rec['response']}"


def hf_chat_generate_fn(model, tokenizer, max_new_tokens: int = 256) -> Callable[[str], str]:
    """A ``generate_fn`` over a transformers model: greedy, chat template, special tokens stripped."""
    import torch

    @torch.no_grad()
    def generate(prompt: str) -> str:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


def build_default_matrix(tokenizer, identity: str, sources: Sequence[str | Path] = (),
                         output: str | Path | None = None, include_stdlib: bool = True,
                         include_package_docs: bool = True, generate_fn: Callable[[str], str] | None = None,
                         prompts: Sequence[str] = CORPUS_PROMPTS, generated_share: float = 0.2, top_k: int = 12,
                         progress: bool = True) -> TrigramMatrix:
    """Build and save the matrix for ``specd ngrams build``.

    ``sources``: text files, JSONL files (``text`` or ``prompt``/``response`` fields) or directories.
    ``generate_fn``: when given, the target's answers to ``prompts`` join the corpus, repeated so
    that they make up about ``generated_share`` of all tri-grams: a few hundred kilobytes of the
    target's own style would otherwise be drowned by tens of megabytes of library code.
    """
    files: list[Path] = [Path(s) for s in sources]
    if include_stdlib:
        files += stdlib_sources()
    if include_package_docs:
        files += package_descriptions()
    streams = list(tokenize_texts(tokenizer, iter_texts(tqdm(files, desc="tokenizing corpus", unit="file",
                                                             disable=not progress))))
    if generate_fn is not None:
        records = generated_records(generate_fn, generated_cache_path(identity), prompts, progress)
        generated = list(tokenize_texts(tokenizer, chat_texts(tokenizer, records)))
        n_static = sum(map(len, streams))
        n_generated = max(1, sum(map(len, generated)))
        repeats = round(generated_share * n_static / ((1.0 - generated_share) * n_generated)) if n_static else 1
        streams += generated * min(1000, max(1, repeats))
    matrix = build_matrix(streams, len(tokenizer), top_k=top_k, identity=identity, progress=progress)
    matrix.save(output or default_matrix_path(identity))
    return matrix
