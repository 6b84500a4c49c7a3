"""Train one stage of SAM-RSP:  python train.py CONFIG [key=value ...]

    python train.py config/pascal/pascal_split0_resnet50.yaml                     # stage sam_rsp
    python train.py config/pascal/pascal_split0_resnet50.yaml train.stage=bam data.shot=5
    torchrun --nproc_per_node=4 train.py config/coco/coco_split0_resnet50.yaml   # 4 GPUs

The stage (``train.stage``: base | bam | sam_rsp), its data, loss and trainable parameters are
chosen by the config; see util/engine.py. ``resume=PATH`` or ``resume=auto`` continues a run.
"""
import sys

from util.cli import run_config_command


def main(argv=None) -> int:
    def command(cfg):
        from util.engine import train
        print(f"checkpoint: {train(cfg)['checkpoint']}")
    return run_config_command(argv, __doc__, command)


if __name__ == "__main__":
    sys.exit(main())
