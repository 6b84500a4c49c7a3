"""Test a checkpoint with the original protocol:  python test.py CONFIG weights=PATH [key=value ...]

    python test.py config/pascal/pascal_split0_resnet50.yaml weights=exp/.../best.pth
    python test.py config/pascal/pascal_split0_resnet50.yaml weights=... data.shot=5 eval.seeds=[321]
    torchrun --nproc_per_node=2 test.py CONFIG weights=...      # same numbers, faster

Default protocol (SPEC 5): seeds [556, 716, 418, 485, 575] x 1000 episodes, scored at original
resolution; mIoU (class-wise) and FB-IoU of the RSP and of the final output, mean +- std over
seeds, every seed, per-class IoU, and the all-foreground baseline. Written to stdout and to
<output_dir>/results.json. ``vis=N`` draws the first N episodes of the first seed.
"""
import sys

from util.cli import run_config_command


def main(argv=None) -> int:
    def command(cfg):
        from util.engine import test
        test(cfg)
    return run_config_command(argv, __doc__, command)


if __name__ == "__main__":
    sys.exit(main())
