"""Run under torchrun by the stage tests (cat_sam, simformer): train a stage, then write this
rank's digest of the trainable tensors (they must agree across ranks: gradients are all-reduced).

    python -m torch.distributed.run --nproc_per_node=2 tests/stage_ddp_worker.py OUT_DIR [CONFIG.yaml] key=value ...
"""
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import util.engine as engine  # noqa: E402
from util.config import load_config  # noqa: E402
from util.distributed import close_processes  # noqa: E402


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    named = model.named_trainable_parameters() if hasattr(model, "named_trainable_parameters") else \
        ((n, p) for n, p in model.named_parameters() if p.requires_grad)
    for key, value in sorted(named, key=lambda item: item[0]):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    config = overrides.pop(0) if overrides and overrides[0].endswith(".yaml") else None
    cfg = load_config(config, overrides)
    seen = {}
    load_pretrained_parts = engine.load_pretrained_parts

    def load_and_remember(model, *args, **kwargs):
        parts = load_pretrained_parts(model, *args, **kwargs)
        seen["model"], seen["initial"] = model, digest(model)
        return parts

    engine.load_pretrained_parts = load_and_remember
    summary = engine.train(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(
        {"step": summary["global_step"], "weights": digest(seen["model"]), "initial": seen["initial"]}))
    close_processes()


if __name__ == "__main__":
    main()
