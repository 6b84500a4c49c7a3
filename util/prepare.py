"""Data preparation commands, one entry point: ``python -m util.prepare <command> [options]``.

    python -m util.prepare --help
    python -m util.prepare toy --help
    python -m util.prepare toy                 # the built-in toy benchmark under data/toy
    python -m util.prepare lists --dataset pascal
    python -m util.prepare coco_masks --root data/coco
    python -m util.prepare kvasir --root data/kvasir    # CAT-SAM lists (also whu, sbu; util.cat_sam_prepare)

A command is a module exposing ``add_arguments(parser)`` and ``run(args)``; registering one is
a single line in :data:`COMMANDS`.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Callable, Sequence

from util import cat_sam_prepare, coco, lists, toy, weakshot_benchmarks
from util.io import DataError

# name -> (add_arguments, run, one-line help)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None], str]] = {
    "toy": (toy.add_arguments, toy.run, "generate the built-in synthetic toy benchmark (default data/toy)"),
    "lists": (lists.add_arguments, lists.run, "write the PASCAL/COCO image lists and check the per-fold counts"),
    "coco_masks": (coco.add_arguments, coco.run, "render COCO2014 class-index PNG masks from instances_*.json"),
    **{name: (partial(cat_sam_prepare.add_arguments, dataset=name), cat_sam_prepare.run,
              f"CAT-SAM: write the {name} lists (train/test, fixed 1-/16-shot) from the original layout")
       for name in cat_sam_prepare.DATASETS},
    "cocostuff10k": (weakshot_benchmarks.add_cocostuff10k_arguments, weakshot_benchmarks.run_cocostuff10k,
                     "SimFormer: COCO-Stuff-10K label PNGs (from the .mat files) and lists, ROOT = the release"),
    "ade20k": (weakshot_benchmarks.add_ade20k_arguments, weakshot_benchmarks.run_ade20k,
               "SimFormer: ADE20K-150 label PNGs (value - 1) and lists, ROOT = ADEChallengeData2016"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="python -m util.prepare", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run_command=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the chosen command."""
    args = build_parser().parse_args(argv)
    try:
        args.run_command(args)
    except DataError as err:   # a user's data problem: the message says what to fix, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
