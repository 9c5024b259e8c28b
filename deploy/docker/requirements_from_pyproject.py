#!/usr/bin/env python3
"""Print pyproject.toml's core dependencies plus those of the given extras, one per line.

Used by the Dockerfile to install the dependency layer from pyproject.toml alone, before any
code is copied, so that code changes do not reinstall dependencies.

    requirements-from-pyproject pyproject.toml serve            # core + [serve]
    requirements-from-pyproject pyproject.toml train --only torch torchvision
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib


def requirement_name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: dict, extras: list[str], only: list[str] | None = None) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise KeyError(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs.extend(optional[extra])
    if only is not None:
        wanted = {requirement_name(n) for n in only}
        reqs = [r for r in reqs if requirement_name(r) in wanted]
    # Keep order, drop exact duplicates (extras repeat fastapi, pillow, ...).
    return list(dict.fromkeys(reqs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("extras", nargs="*")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="keep only these projects")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        data = tomllib.load(f)
    try:
        lines = requirements(data, args.extras, args.only)
    except (KeyError, ValueError) as exc:
        print(f"requirements-from-pyproject: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
