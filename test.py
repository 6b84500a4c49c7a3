"""Test a checkpoint with the original protocol:  python test.py CONFIG weights=PATH [key=value ...]

    python test.py config/pascal/pascal_split0_resnet50.yaml weights=exp/.../best.pth
    python test.py config/pascal/pascal_split0_resnet50.yaml weights=... data.shot=5 eval.seeds=[321]
    torchrun --nproc_per_node=2 test.py CONFIG weights=...      # same numbers, faster

Default protocol (SPEC 5): seeds [556, 716, 418, 485, 575] x 1000 episodes, scored at original
resolution; mIoU (class-wise) and FB-IoU of the RSP and of the final output, mean +- std over
seeds, every seed, per-class IoU, and the all-foreground baseline. Written to stdout and to
<output_dir>/results.json. ``vis=N`` draws the first N episodes of the first seed.
"""
import argparse
import sys

from util.config import ConfigError, load_config
from util.io import DataError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="weights=PATH and dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from util.engine import test
        test(cfg)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        from util.distributed import close_processes
        close_processes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
