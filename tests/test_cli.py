"""The `specd` CLI, in process and as a real subprocess: JSON output, identity across methods, clear errors."""

import json
import subprocess
import sys

import pytest

from specd.cli import main

TINY = ["--model", "tiny-llama", "--no-chat", "--max-new-tokens", "24"]


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_ar_and_sd_identical(capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n{"prompt": "def f(x):"}\n')
    code, ar_out, _ = run_cli(capsys, "generate", *TINY, "--prompts-file", str(prompts), "--json")
    assert code == 0
    code, sd_out, _ = run_cli(capsys, "generate", *TINY, "--prompts-file", str(prompts), "--json",
                              "--method", "sd", "--draft-model", "tiny-llama:1")
    assert code == 0
    ar = [json.loads(line) for line in ar_out.splitlines()]
    sd = [json.loads(line) for line in sd_out.splitlines()]
    assert [r["prompt"] for r in ar] == ["hello there", "def f(x):"]
    assert [r["token_ids"] for r in ar] == [r["token_ids"] for r in sd]
    for r in ar + sd:
        assert set(r["stats"]) >= {"new_tokens", "target_forwards", "tokens_per_forward", "seconds",
                                   "tokens_per_second", "accepted_per_position", "lossless"}
        assert r["stats"]["new_tokens"] == len(r["token_ids"])


def test_plain_text_prompts_file_and_stream(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    code, out, err = run_cli(capsys, "generate", *TINY, "--prompts-file", str(prompts), "--stream")
    assert code == 0
    assert err.count("[ar] ") == 2 and "tokens/forward" in err


def test_generate_without_batch_invariance_decodes_a_batch(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\nsecond, longer prompt here\n")
    code, out, err = run_cli(capsys, "generate", *TINY, "--prompts-file", str(prompts), "--concurrency", "2",
                             "--no-batch-invariance", "--json")
    assert code == 0 and len(out.strip().splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["generate", *TINY, ""], "empty prompt"),
    (["generate", *TINY], "no prompt given"),
    (["generate", *TINY, "hi", "--method", "nope"], "unknown method"),
    (["generate", *TINY, "hi", "--method", "sd"], "needs a draft model"),
    (["generate", *TINY, "hi", "--temperature", "-1"], "temperature"),
    (["generate", *TINY, "hi", "--top-p", "0"], "top_p"),
    (["generate", *TINY, "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "--model", "no-such-model", "hi"], "no-such-model"),
    (["generate", *TINY, "--prompts-file", "/nonexistent.jsonl"], "not found"),
    (["generate", *TINY, "hi", "--no-batch-invariance", "--tp", "2"], "--no-batch-invariance is for one process"),
])
def test_bad_input_is_a_message(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_bad_jsonl_line_names_the_line(capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    code, _, err = run_cli(capsys, "generate", *TINY, "--prompts-file", str(prompts))
    assert code == 2 and "p.jsonl:2" in err


def test_subprocess_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "specd.cli", "generate", "--model", "tiny-llama", "--no-chat",
                           "--top-k", "-3", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "top_k" in proc.stderr and "Traceback" not in proc.stderr


def test_models_list(capsys):
    code, out, _ = run_cli(capsys, "models", "list")
    assert code == 0 and "smollm2-135m" in out and "qwen2.5-coder-1.5b" in out


def test_profile_writes_curve(capsys, tmp_path):
    out_file = tmp_path / "profile.json"
    code, _, _ = run_cli(capsys, "profile", "--model", "tiny-llama", "--out", str(out_file), "--repeats", "1",
                         "--k", "1,4,8", "--context-lengths", "16,32", "--batch", "1,2")
    assert code == 0
    profile = json.loads(out_file.read_text())
    # seconds[context][rows][k]
    assert profile["k"] == [1, 4, 8] and profile["batch"] == [1, 2] and len(profile["seconds"]) == 2
    assert [len(row) for row in profile["seconds"][0]] == [3, 3]
    assert (profile["device"], profile["dtype"]) == ("cpu", "float32")
    from actors.cost import CostModel

    cost = CostModel.from_profile(profile)
    assert 0 < cost.forward_seconds(4, 16) <= cost.forward_seconds(4, 16, rows=2)
