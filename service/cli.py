"""The ``mtserve`` command. Each subcommand lives in its own module, imported without torch;
training subcommands import torch only when they run."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from contract.errors import UserError

# name -> (module, help). Each module exposes add_arguments(parser) and run(args) -> int,
# and must import neither torch nor timm at import time.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.serve_cli", "serve a bundle over HTTP (onnxruntime; no torch)"),
    "inspect": ("service.inspect_cli", "print a bundle's plan, tasks, labels, parameters and bytes"),
    "bench": ("service.bench.cli", "benchmark the engine and the service"),
    "data": ("training.data_cli", "build offline data sets (demo, mdb)"),
    "train": ("training.train_cli", "train a multi-task model from a YAML config"),
    "export": ("training.export_cli", "export a training run to a verified ONNX bundle"),
    "add-task": ("training.add_task_cli", "add a task: train only its own variants on the frozen trunk"),
    "remove-task": ("training.remove_task", "a new bundle version without one task (files byte-identical)"),
    "quantize": ("training.quantize_cli", "int8 (CPU) / fp16 (GPU) copy of a bundle, accuracy checked"),
    "experiment": ("training.experiment_cli", "run the paper's plan comparison"),
}


def _user_error_types() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    return (UserError, ValidationError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # an optional part not installed / not built yet
            if exc.name and exc.name.split(".")[0] in [*module_name.split("."), "training", "service"]:
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except _user_error_types() as exc:
        if os.environ.get("MTSERVE_DEBUG"):
            raise
        message = str(exc).strip().replace("\n", " ")
        print(f"mtserve {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
