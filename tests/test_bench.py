"""The benchmark package: one harness (warm-up, rotation, per-item checkpoints) and a suite table the CLI reads."""

import importlib

from specd.bench import SUITES
from specd.bench.harness import interleave
from specd.cli import build_parser


def test_interleave_warms_up_rotates_and_reports_in_name_order():
    calls, warmed, done = [], [], []
    interleave(["p0", "p1", "p2", "p3"], ["a", "b", "c"], lambda item, name: calls.append((item, name)) or name,
               warmed.append, lambda i, item, results: done.append((i, item, list(results))))
    assert warmed == ["a", "b", "c"]
    firsts = [calls[3 * i][1] for i in range(4)]
    assert firsts == ["a", "b", "c", "a"]  # who goes first rotates per item
    assert sorted(calls) == sorted((f"p{i}", n) for i in range(4) for n in "abc")
    assert done == [(i, f"p{i}", ["a", "b", "c"]) for i in range(4)]


def test_every_suite_is_a_choice_with_a_runner():
    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                 if a.dest == "suite")
    assert list(bench.choices) == list(SUITES)
    for suite in SUITES.values():
        assert callable(importlib.import_module(suite.module).run)


def test_machine_names_what_the_figures_ran_on():
    from specd.bench.harness import machine

    m = machine()
    assert m["cpu"] and m["cpus"] >= 1 and m["memory_gib"] > 0 and m["torch"] and m["transformers"]
