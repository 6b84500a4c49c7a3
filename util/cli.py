"""The shared command line of train.py and test.py: ``CONFIG [key=value ...]``.

A user's mistake (a bad config key, a missing file, a weights file that does not fit) ends with
``error: <message>`` and exit code 2, without a traceback; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Mapping, Optional, Sequence


def _close_progress_bars() -> None:
    """End the progress bars the error interrupted, so that the error starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_config_command(argv: Optional[Sequence[str]], doc: str, command: Callable[[Mapping], None]) -> int:
    """Parse ``CONFIG [key=value ...]``, load the config and run ``command(cfg)``."""
    from util.checkpoint import CheckpointError
    from util.config import ConfigError, load_config
    from util.distributed import close_processes
    from util.io import DataError, worker_error_message

    parser = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.shot=5 weights=PATH")
    args = parser.parse_args(argv)
    try:
        command(load_config(args.config, args.overrides))
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        _close_progress_bars()
        # raised in a DataLoader worker, the error comes back wrapped with the worker's traceback
        print(f"error: {worker_error_message(str(err))}", file=sys.stderr)
        return 2
    finally:
        close_processes()
    return 0
