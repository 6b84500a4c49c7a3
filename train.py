"""Train one stage of SAM-RSP:  python train.py CONFIG [key=value ...]

    python train.py config/pascal/pascal_split0_resnet50.yaml                     # stage sam_rsp
    python train.py config/pascal/pascal_split0_resnet50.yaml train.stage=bam data.shot=5
    torchrun --nproc_per_node=4 train.py config/coco/coco_split0_resnet50.yaml   # 4 GPUs

The stage (``train.stage``: base | bam | sam_rsp), its data, loss and trainable parameters are
chosen by the config; see util/engine.py. ``resume=PATH`` or ``resume=auto`` continues a run.
"""
import argparse
import sys

from util.config import ConfigError, load_config
from util.io import DataError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.sam_rsp.lr=0.005")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from util.engine import train
        summary = train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        from util.distributed import close_processes
        close_processes()
    print(f"checkpoint: {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
