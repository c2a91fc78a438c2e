"""`qrun` command line: a thin argparse layer. Each subcommand lives in its own module under qrun/cli/ with
`add_parser(subparsers)` (which sets `func`) and calls a library function an app could call itself."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that register subcommands, in the order `qrun --help` lists them.
COMMAND_MODULES = ["generate_cmd", "convert_cmd", "eval_cmd", "bench_cmd", "tune_cmd"]


def build_parser() -> argparse.ArgumentParser:
    from qrun import __version__
    p = argparse.ArgumentParser(prog="qrun", description="Run quantized Qwen2/Llama-style LLMs from one .stcmp file.")
    p.add_argument("--version", action="version", version=f"qrun {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for m in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"qrun.cli.{m}")
        except ModuleNotFoundError as e:
            if e.name == f"qrun.cli.{m}":
                continue  # not written yet
            raise
        mod.add_parser(sub)
    return p


def _message(e: BaseException) -> str:
    import torch
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of GPU memory: " + str(e).split("\n")[0] + " (try a smaller --max-seq-len)"
    if isinstance(e, MemoryError):
        return "out of host memory"
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: no such file or directory"
    msg = str(e).strip().split("\n")[0] or type(e).__name__
    return msg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        return int(rc or 0)
    except KeyboardInterrupt:
        print("qrun: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # one line for the user; QRUN_DEBUG=1 shows the traceback
        if os.environ.get("QRUN_DEBUG"):
            raise
        print(f"qrun: error: {_message(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
