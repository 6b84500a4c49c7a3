"""SCCAN on tiny networks (CPU, fast): shapes, frozen/trainable parts, batch independence, the
weighted Dice loss, the prompt, and checkpoints refused between SCCAN and BAM."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.bam import BAM  # noqa: E402
from model.decoder import SAMRSPDecoder  # noqa: E402
from model.sam_encoder import build_sam_encoder  # noqa: E402
from model.sam_rsp import SAMRSP  # noqa: E402
from model.scca_transformer import window_partition, window_reverse  # noqa: E402
from model.sccan import SCCAN, FrozenBatchNorm2d  # noqa: E402
from util.checkpoint import CheckpointError, checkpoint_payload, load_weights, save_checkpoint  # noqa: E402
from util.losses import sccan_loss, weighted_dice_loss  # noqa: E402

TINY = dict(backbone="resnet50", backbone_width=8, backbone_blocks=[1, 1, 1, 1], reduce_dim=16, depth=4,
            num_heads=2, window_size=4, grid_size=16)


def tiny_sccan(seed=0) -> SCCAN:
    torch.manual_seed(seed)
    return SCCAN(**TINY)


def tiny_bam(seed=0) -> BAM:
    torch.manual_seed(seed)
    return BAM(backbone="resnet50", backbone_width=8, backbone_blocks=[1, 1, 1, 1], reduce_dim=16,
               base_hidden_dim=16)


def tiny_sam_rsp(rspg) -> SAMRSP:
    encoder = build_sam_encoder("vit_b", img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                global_attn_indexes=[1], out_chans=32)
    decoder = SAMRSPDecoder(embed_dim=32, grid_size=4, depth=2, num_heads=4)
    return SAMRSP(rspg=rspg, image_encoder=encoder, decoder=decoder, frozen_train_mode=False)


def episode(batch=2, shot=1, size=65, seed=0):
    """Random images, support masks with 0/1/255 (a foreground block so windows are aligned), a target."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, size, size, generator=gen)
    supports = torch.randn(batch, shot, 3, size, size, generator=gen)
    masks = torch.zeros(batch, shot, size, size)
    masks[..., 10:45, 15:50] = 1
    masks[..., :3, :] = 255
    target = torch.randint(0, 2, (batch, size, size), generator=gen)
    target[:, -2:] = 255
    return query, supports, masks, target


# --------------------------------------------------------------------------------------------
# Forward / backward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shot", [1, 5])
def test_forward_backward(shot):
    model = tiny_sccan().train()
    query, supports, masks, target = episode(shot=shot)
    out = model(query, supports, masks)
    assert out["logits"].shape == (2, 2, 65, 65)
    assert out["logits_64"].shape == (2, 2, 16, 16)
    assert out["prior"].shape == (2, 1, 16, 16) and out["supp_mask_64"].shape == (2, 1, 16, 16)
    assert out["transformer_out"].shape == (2, 16, 16, 16) and out["supp_proto"].shape == (2, 16)
    # even blocks: (16 / 4)^2 windows; odd blocks pad 2 on each side: (20 / 4)^2
    assert [tuple(i.shape) for i in out["align_index"]] == [(2, 16), (2, 25)] * 2
    assert 0 <= out["prior"].min() and out["prior"].max() <= 1
    loss, parts = sccan_loss(out, {"query_mask": target})
    assert set(parts) == {"loss"} and not parts["loss"].requires_grad
    loss.backward()
    # the support stream's output of the LAST block feeds nothing (as in the original): its
    # support attention and MLP are trainable but get no gradient
    last = f"transformer.layers.0.blocks.{TINY['depth'] - 1}."
    unused = (last + "attn_s.", last + "mlp_s.")
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, name
        elif name.startswith(unused):
            assert p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules()
               if "BatchNorm" in type(m).__name__)


def test_same_outputs_in_train_and_eval_without_dropout():
    """Train mode differs from eval only by Dropout (the frozen BN has no mode; same return type)."""
    model = tiny_sccan()
    query, supports, masks, _ = episode()
    with torch.no_grad():
        model.eval()
        reference = model(query, supports, masks)
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout2d):
                module.p = 0.0
        trained = model(query, supports, masks)
    assert reference.keys() == trained.keys()
    assert torch.allclose(reference["logits"], trained["logits"], atol=1e-5)


def test_eval_is_batch_independent_and_features_can_be_cached():
    model = tiny_sccan().eval()
    query, supports, masks, _ = episode(batch=2, shot=2)
    with torch.no_grad():
        both = model(query, supports, masks)
        for b in range(2):
            alone = model(query[b:b + 1], supports[b:b + 1], masks[b:b + 1])
            assert (alone["logits"][0] - both["logits"][b]).abs().max() <= 1e-5
            for got, want in zip(alone["align_index"], both["align_index"]):
                assert torch.equal(got[0], want[b])
        cached = model(query, None, None, query_feats=model.extract_query_features(query),
                       support_feats=model.extract_support_features(supports, masks))
    assert torch.equal(cached["logits"], both["logits"])


def test_prompt_is_the_softmax_of_the_logits():
    model = tiny_sccan().eval()
    query, supports, masks, _ = episode()
    with torch.no_grad():
        logits = model(query, supports, masks)["logits"]
        prompt = model.prompt(query, supports, masks, class_ids=torch.tensor([3, 4]))
    assert prompt.shape == (2, 2, 65, 65)
    assert torch.allclose(prompt, logits.softmax(1), atol=1e-6)
    assert torch.allclose(prompt.sum(1), torch.ones(2, 65, 65), atol=1e-6)


def test_windows_round_trip_row_major():
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.float32).view(2, 8, 8, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2, 4, 16, 3)
    assert torch.equal(windows[0, 1, 0], x[0, 0, 4])   # window 1 = top-right, its first token
    assert torch.equal(windows[0, 2, 5], x[0, 5, 1])   # window 2 = bottom-left, token (1, 1)
    assert torch.equal(window_reverse(windows, 4, 8, 8), x)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

def test_weighted_dice_loss_by_hand():
    ln3 = torch.log(torch.tensor(3.0)).item()
    # sample 0: pixels with target 0, 1, 255; p0 = 0.5 everywhere, p1 = 0.75, 0.25, 0.5
    # sample 1: three foreground pixels, p = 0.5 in both channels
    logits = torch.tensor([[[[0.0, 0.0, 0.0]], [[ln3, -ln3, 0.0]]],
                           [[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]])          # 2 x 2 x 1 x 3
    target = torch.tensor([[[0, 1, 255]], [[1, 1, 1]]])                      # 2 x 1 x 3
    # per channel 1 - 2 sum(t p) / (sum(p^2) + sum(t^2)); the 255 pixel counts in sum(p^2):
    bg0 = 1 - 2 * 0.5 / (0.75 + 1)                                  # 3/7
    fg0 = 1 - 2 * 0.25 / ((0.5625 + 0.0625 + 0.25) + 1)            # 11/15
    bg1 = 1 - 0 / (0.75 + 0)                                        # no background at all: 1
    fg1 = 1 - 2 * 1.5 / (0.75 + 3)                                  # 0.2
    expected = (bg0 + fg0 + bg1 + fg1) / 2
    assert abs(expected - (122 / 105 + 1.2) / 2) < 1e-12
    got = weighted_dice_loss(logits, target)
    assert got.shape == () and abs(got.item() - expected) < 1e-6
    total, parts = sccan_loss({"logits": logits}, {"query_mask": target})
    assert abs(total.item() - expected) < 1e-6 and parts["loss"].item() == total.item()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def original_sccan_file(tmp_path, model, prefix=""):
    path = tmp_path / f"sccan{prefix or '_'}pth"
    torch.save({"epoch": 3.5, "state_dict": {prefix + k: v for k, v in model.state_dict().items()},
                "optimizer": {}, "optimizer_swin": {}}, path)
    return path


def test_original_sccan_checkpoint_round_trip(tmp_path):
    source = tiny_sccan(seed=1)
    for prefix in ("", "module."):
        model = tiny_sccan(seed=2)
        report = load_weights(model, original_sccan_file(tmp_path, source, prefix), require_complete=True)
        assert report.format == "sccan_original" and report.target == "SCCAN"
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_imagenet_resnet_into_the_sccan_backbone(tmp_path):
    source = tiny_sccan(seed=1)
    state = {k[len("backbone.body."):]: v for k, v in source.state_dict().items() if k.startswith("backbone.body.")}
    state["bn1.num_batches_tracked"] = torch.tensor(0)            # a counter FrozenBN does not have
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 256), torch.randn(1000)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(state, path)
    model = tiny_sccan(seed=2)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    report = load_weights(model, path)
    assert report.format == "imagenet_resnet" and {"fc.weight", "bn1.num_batches_tracked"} <= set(report.ignored)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in source.state_dict().items() if k.startswith("backbone."))
    assert all(torch.equal(after[k], v) for k, v in head_before.items())
    sam_rsp = tiny_sam_rsp(tiny_sccan(seed=3))                   # SAMRSP over SCCAN: into rspg.backbone.body
    load_weights(sam_rsp, path)
    assert torch.equal(sam_rsp.rspg.backbone.body.conv1.weight, source.backbone.body.conv1.weight)


def test_sccan_and_bam_checkpoints_are_refused_across(tmp_path):
    sccan_path = original_sccan_file(tmp_path, tiny_sccan(seed=1))
    bam_path = tmp_path / "bam.pth"
    torch.save({"state_dict": tiny_bam(seed=1).state_dict()}, bam_path)

    with pytest.raises(CheckpointError, match="original SCCAN checkpoint") as err:
        load_weights(tiny_bam(), sccan_path)
    assert str(sccan_path) in str(err.value) and "not into a BAM" in str(err.value)
    with pytest.raises(CheckpointError, match="original BAM checkpoint") as err:
        load_weights(tiny_sccan(), bam_path)
    assert str(bam_path) in str(err.value) and "not into a SCCAN" in str(err.value)

    over_bam, over_sccan = tiny_sam_rsp(tiny_bam()), tiny_sam_rsp(tiny_sccan())
    with pytest.raises(CheckpointError, match="original SCCAN checkpoint") as err:
        load_weights(over_bam, sccan_path)
    assert str(sccan_path) in str(err.value) and "SAMRSP.rspg (a SCCAN)" in str(err.value)
    assert "rspg, model.rspg.type) is a BAM" in str(err.value)
    with pytest.raises(CheckpointError, match="original BAM checkpoint") as err:
        load_weights(over_sccan, bam_path)
    assert "SAMRSP.rspg (a BAM)" in str(err.value) and "is a SCCAN" in str(err.value)

    # the right pairs load
    assert load_weights(over_sccan, sccan_path).target == "SAMRSP.rspg"
    assert load_weights(over_bam, bam_path).target == "SAMRSP.rspg"


def test_our_sccan_checkpoint_routes_to_the_prompt_generator(tmp_path):
    source = tiny_sccan(seed=1)
    path = save_checkpoint(checkpoint_payload(source, stage="sccan"), tmp_path / "best.pth")
    model = tiny_sccan(seed=2)
    load_weights(model, path, require_complete=True)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    over_sccan = tiny_sam_rsp(tiny_sccan(seed=3))
    assert load_weights(over_sccan, path).target == "SAMRSP.rspg"
    assert torch.equal(over_sccan.rspg.cls_meta[3].weight, source.cls_meta[3].weight)
    with pytest.raises(CheckpointError, match=r"stage 'sccan' \(a SCCAN\)"):
        load_weights(tiny_sam_rsp(tiny_bam()), path)
