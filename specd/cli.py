"""The ``specd`` command line. Errors are one-line messages (exit 2), never tracebacks.

Each command lives in its own module and adds its own parser (``add_*_parser(sub)``); this module only
composes them and turns errors into messages. A new command is one module and one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from specd.bench import add_bench_parser
from specd.common import UsageError
from specd.generate_cmd import add_generate_parser
from specd.serve_cmd import add_serve_parser
from specd.tools_cmd import add_k8s_parser, add_models_parser, add_ngrams_parser, add_profile_parser

COMMANDS = (add_generate_parser, add_serve_parser, add_profile_parser, add_bench_parser, add_ngrams_parser,
            add_models_parser, add_k8s_parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
        return _fail(f"invalid parameters: {errors}")
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"specd: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specd", description="Speculative decoding: generate, profile, serve.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
