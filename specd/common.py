"""Helpers every ``specd`` command shares. A leaf: it imports nothing of the project, so the command
modules, the benchmark suites and ``specd.cli`` can all import it without importing each other."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A problem with what the user asked for: reported as a one-line message (exit 2)."""


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated increasing positive integers (``1,2,4,8``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError("expected increasing positive integers")
    return values
