"""Model tests on tiny networks (CPU, fast): shapes, frozen/trainable parts, modes, equivalences."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from segment_anything.modeling.image_encoder import Attention, Block  # noqa: E402

import model.attention as attention_module  # noqa: E402
from model import (BAM, PSPNet, SAMRSP, SAMRSPDecoder, build_model, build_sam_encoder,  # noqa: E402
                   pixel_prototype, set_attention)
from model.attention import SDPAAttention  # noqa: E402
from util.config import load_config  # noqa: E402

TINY = ["model.backbone_width=8", "model.backbone_blocks=[1,1,1,1]", "model.rspg.reduce_dim=32",
        "model.base_learner.hidden_dim=32", "model.sam.embed_dim=32", "model.sam.depth=2", "model.sam.num_heads=2",
        "model.sam.global_attn_indexes=[1]", "model.sam.img_size=128", "model.sam.patch_size=16",
        "model.sam.out_chans=32", "model.decoder.num_heads=4"]


def tiny_config(backbone="resnet50", shot=1, stage="sam_rsp", extra=()):
    return load_config(None, TINY + [f"model.backbone={backbone}", f"data.shot={shot}",
                                     f"train.stage={stage}", *extra])


def episode(batch=2, shot=1, size=65, seed=0):
    """Random images, support masks with 0/1/255, a query target and base-learner class ids."""
    gen = torch.Generator().manual_seed(seed)
    h, w = (size, size) if isinstance(size, int) else size
    query = torch.randn(batch, 3, h, w, generator=gen)
    supports = torch.randn(batch, shot, 3, h, w, generator=gen)
    masks = torch.randint(0, 2, (batch, shot, h, w), generator=gen).float()
    masks[..., :3, :] = 255
    target = torch.randint(0, 2, (batch, h, w), generator=gen)
    class_ids = torch.randint(1, 16, (batch,), generator=gen)
    return query, supports, masks, target, class_ids


def randomise_rel_pos(module: nn.Module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


# --------------------------------------------------------------------------------------------
# Forward / backward, frozen and trainable parts
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["vgg16_bn", "resnet50"])
@pytest.mark.parametrize("shot", [1, 5])
def test_sam_rsp_forward_backward(backbone, shot):
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone, shot)).train()
    query, supports, masks, target, class_ids = episode(shot=shot)
    out = model(query, supports, masks, class_ids)
    assert out["logits"].shape == (2, 2, 65, 65)
    assert out["prompt_logits"].shape == (2, 2, 65, 65)
    assert len(out["aux_logits"]) == 2 and all(o.shape == (2, 2, 65, 65) for o in out["aux_logits"])
    assert not out["prompt_logits"].requires_grad
    loss = F.cross_entropy(out["logits"], target) + sum(F.cross_entropy(o, target) for o in out["aux_logits"]) / 2
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("decoder."):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for p in model.decoder.parameters())


def test_bam_forward_backward_trains_only_the_meta_learner():
    model = build_model(tiny_config("resnet50", 1, stage="bam")).train()
    query, supports, masks, target, class_ids = episode()
    out = model(query, supports, masks, class_ids)
    assert out["logits"].shape == (2, 2, 65, 65) and out["meta_logits"].shape == (2, 2, 65, 65)
    assert out["base_logits"].shape == (2, 16, 65, 65)
    (F.cross_entropy(out["logits"], target) + F.cross_entropy(out["meta_logits"], target)).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(("layer", "learner_base"))
        assert p.requires_grad != frozen, name
        assert (p.grad is None) == frozen, name


def test_pspnet_forward_backward():
    model = build_model(tiny_config("vgg16_bn", stage="base")).train()
    query, _, _, target, _ = episode(size=(65, 97))
    logits = model(query)["logits"]
    assert logits.shape == (2, 16, 65, 97)
    F.cross_entropy(logits, target.new_zeros(2, 65, 97)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_decoder_parameter_count_at_full_size():
    decoder = SAMRSPDecoder(embed_dim=256, grid_size=64, depth=3, num_heads=16, inner_dim=8)
    assert sum(p.numel() for p in decoder.parameters()) == 4_443_206
    # The whole model with a tiny encoder but out_chans 256: only the head trains.
    model = build_model(tiny_config(extra=["model.sam.out_chans=256", "model.decoder.num_heads=16"]))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4_443_206


@pytest.mark.parametrize("backbone,size,batch", [("vgg16_bn", 473, 3), ("resnet50", 641, 1),
                                                 ("resnet50", (97, 65), 2)])
def test_output_shapes_follow_the_input(backbone, size, batch):
    model = build_model(tiny_config(backbone)).eval()
    query, supports, masks, _, _ = episode(batch=batch, size=size)
    h, w = query.shape[-2:]
    with torch.no_grad():
        out = model(query, supports, masks)
    assert out["logits"].shape == (batch, 2, h, w)
    assert out["prompt_logits"].shape == (batch, 2, h, w)
    assert "aux_logits" not in out
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["prompt_logits"]).all()


def test_backbone_feature_sizes_at_473():
    from model.backbone import build_backbone
    x = torch.randn(1, 3, 473, 473)
    with torch.no_grad():
        vgg = build_backbone("vgg16_bn", width=8).eval()(x)
        res = build_backbone("resnet50", width=8, blocks=[1, 1, 1, 1]).eval()(x)
    assert [tuple(f.shape[1:]) for f in vgg[2:]] == [(32, 60, 60), (64, 30, 30), (64, 30, 30)]
    assert [tuple(f.shape[1:]) for f in res[2:]] == [(64, 60, 60), (128, 60, 60), (256, 60, 60)]


# --------------------------------------------------------------------------------------------
# Modes of the frozen parts
# --------------------------------------------------------------------------------------------

def _batchnorms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _dropouts(module):
    return [m for m in module.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]


@pytest.mark.parametrize("frozen_train_mode", [True, False])
def test_train_mode_of_frozen_parts(frozen_train_mode):
    model = build_model(tiny_config(extra=[f"model.rspg.frozen_train_mode={str(frozen_train_mode).lower()}"]))
    model.train()
    assert model.decoder.training
    assert not model.image_encoder.training
    assert all(not bn.training for bn in _batchnorms(model.rspg))
    assert all(d.training == frozen_train_mode for d in _dropouts(model.rspg))
    assert model.rspg.training == frozen_train_mode
    model.eval()
    assert not any(m.training for m in model.modules())


def test_bam_batchnorm_stays_frozen_in_training():
    model = build_model(tiny_config("vgg16_bn", stage="bam")).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    query, supports, masks, _, class_ids = episode()
    model(query, supports, masks, class_ids)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(d.training for d in _dropouts(model.learner_base))  # the original's Dropout2d stays active


def test_bam_training_needs_class_ids():
    model = build_model(tiny_config(stage="bam")).train()
    query, supports, masks, _, _ = episode()
    with pytest.raises(ValueError, match="class_ids"):
        model(query, supports, masks)


def test_precomputed_frozen_outputs_give_the_same_result():
    model = build_model(tiny_config("vgg16_bn")).eval()
    query, supports, masks, _, _ = episode()
    with torch.no_grad():
        direct = model(query, supports, masks)
        cached = model(query, supports, masks, query_embedding=model.embed_query(query),
                       query_feats=model.rspg.extract_query_features(query))
    assert torch.equal(direct["logits"], cached["logits"])
    assert torch.equal(direct["prompt_logits"], cached["prompt_logits"])


def test_autocast_bfloat16_cpu_runs():
    model = build_model(tiny_config("resnet50")).eval()
    query, supports, masks, _, _ = episode(batch=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(query, supports, masks)
    assert torch.isfinite(out["logits"].float()).all()


def test_model_code_has_no_cuda_calls_or_deepcopy():
    for path in (ROOT / "model").glob("*.py"):
        text = path.read_text()
        assert ".cuda(" not in text and "deepcopy" not in text and "device='cuda'" not in text, path


# --------------------------------------------------------------------------------------------
# Equivalences with the original's per-sample loops (SPEC 1.5, 2.4, 2.3.5)
# --------------------------------------------------------------------------------------------

def test_base_map_exclusion_equals_the_loop():
    model = build_model(tiny_config(stage="bam")).train()
    gen = torch.Generator().manual_seed(1)
    base_soft = torch.randn(5, 16, 9, 7, generator=gen).softmax(1)
    class_ids = torch.tensor([1, 15, 7, 7, 3])
    vectorised = model.base_map(base_soft, class_ids)
    channels = torch.arange(16)
    loop = torch.cat([base_soft[b, (channels != 0) & (channels != class_ids[b] )].unsqueeze(0).sum(1, True)
                      for b in range(5)], 0)
    torch.testing.assert_close(vectorised, loop, rtol=0, atol=1e-6)
    model.eval()
    torch.testing.assert_close(model.base_map(base_soft, class_ids), base_soft[:, 1:].sum(1, True))


def _prototype_loop(features, prompt):
    """SPEC 1.5 written per sample, as the original loops over the batch."""
    protos = []
    for b in range(features.shape[0]):
        c, h, w = features.shape[1:]
        f = features[b].reshape(c, h * w)
        a = f.t() @ f / math.sqrt(c)
        a = (a - a.min(1, keepdim=True)[0]) / (a.max(1, keepdim=True)[0] - a.min(1, keepdim=True)[0] + 1e-7)
        a = a * (prompt[b, 1] - prompt[b, 0]).reshape(1, h * w).clamp(min=0)
        a = F.threshold(a, 0, -1e7).softmax(1)
        protos.append((a @ f.t()).t().reshape(c, h, w))
    return torch.stack(protos)


def test_batched_prototype_equals_the_loop():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(3, 16, 12, 12, generator=gen)
    prompt = torch.rand(3, 2, 12, 12, generator=gen)
    prompt[2, 1] = 0.0  # no positive pixel: uniform rows, the mean feature
    batched = pixel_prototype(features, prompt)
    torch.testing.assert_close(batched, _prototype_loop(features, prompt), rtol=1e-5, atol=1e-6)
    mean = features[2].mean((1, 2), keepdim=True).expand_as(features[2])
    torch.testing.assert_close(batched[2], mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trans_dim", [0, 2])
def test_shot_weights_follow_each_shot(trans_dim):
    model = build_model(tiny_config(shot=4, stage="bam", extra=[f"model.rspg.kshot_trans_dim={trans_dim}"]))
    with torch.no_grad():
        for p in model.kshot_rw.parameters():
            p.copy_(torch.randn_like(p))
    est = torch.tensor([[0.3, 0.1, 0.4, 0.2], [0.5, 0.6, 0.2, 0.1]]).view(2, 4, 1, 1)
    weights = model.shot_weights(est)
    for b in range(2):  # per sample: sort, map, put back in order, softmax
        order = est[b, :, 0, 0].argsort()
        mapped = model.kshot_rw(est[b, order].view(1, 4, 1, 1)).view(4)
        expected = torch.empty(4)
        expected[order] = mapped
        torch.testing.assert_close(weights[b].view(4), expected.softmax(0))


def test_k_identical_shots_equal_one_shot():
    """With K copies of one support every weighting is a convex combination of equal terms."""
    one = build_model(tiny_config("vgg16_bn", 1, stage="bam")).eval()
    five = build_model(tiny_config("vgg16_bn", 5, stage="bam")).eval()
    five.load_state_dict({**one.state_dict(), **{k: v for k, v in five.state_dict().items() if "kshot" in k}})
    query, supports, masks, _, _ = episode()
    with torch.no_grad():
        a = one(query, supports, masks)
        b = five(query, supports.expand(-1, 5, -1, -1, -1), masks.expand(-1, 5, -1, -1))
    for key in ("logits", "meta_logits", "base_logits"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# SDPA attention
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("img_size,patch_size", [(128, 8), (112, 8)])  # grids 16 (padded windows) and 14
@pytest.mark.parametrize("max_bias", [None, 512])                        # 512: many query chunks
def test_sdpa_attention_equals_reference(monkeypatch, img_size, patch_size, max_bias):
    if max_bias is not None:
        monkeypatch.setattr(attention_module, "MAX_BIAS_ELEMENTS", max_bias)
    torch.manual_seed(0)
    encoder = build_sam_encoder("vit_b", img_size=img_size, patch_size=patch_size, embed_dim=32, depth=3,
                                num_heads=2, global_attn_indexes=[1], window_size=14, attention="reference").eval()
    randomise_rel_pos(encoder)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        reference = encoder(x)
        set_attention(encoder, "sdpa")
        assert all(type(m) is SDPAAttention for m in encoder.modules() if isinstance(m, Attention))
        sdpa = encoder(x)
    assert (sdpa - reference).abs().max().item() <= 1e-4


def test_sdpa_block_gradients_equal_reference():
    torch.manual_seed(0)
    for window in (0, 4):  # global and windowed (grid 10: padded windows)
        block = Block(dim=32, num_heads=4, use_rel_pos=True, window_size=window, input_size=(10, 10))
        randomise_rel_pos(block)
        x = torch.randn(2, 10, 10, 32, requires_grad=True)
        grads = []
        for impl in ("reference", "sdpa"):
            set_attention(block, impl)
            block.zero_grad()
            x.grad = None
            out = block(x)
            (out * torch.linspace(-1, 1, 32)).sum().backward()
            grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
        for g_ref, g_sdpa in zip(*grads):
            torch.testing.assert_close(g_sdpa, g_ref, rtol=1e-4, atol=1e-5)


def test_set_attention_keeps_parameters():
    encoder = build_sam_encoder("vit_b", img_size=64, patch_size=16, embed_dim=16, depth=2, num_heads=2,
                                global_attn_indexes=[1])
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    set_attention(encoder, "reference")
    assert all(type(m) is Attention for m in encoder.modules() if isinstance(m, Attention))
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(ValueError):
        set_attention(encoder, "flash")


def test_build_model_reads_no_file(monkeypatch):
    import builtins
    def refuse(*args, **kwargs):
        raise AssertionError(f"build_model opened a file: {args[:1]}")
    cfg = tiny_config()
    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert isinstance(build_model(cfg), SAMRSP)
    assert isinstance(build_model(cfg, "bam"), BAM)
    assert isinstance(build_model(cfg, "base"), PSPNet)


def test_sam_rsp_trains_inside_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = build_model(tiny_config("vgg16_bn", 1))
        net = DistributedDataParallel(model)
        net.train()
        assert not model.image_encoder.training and all(not bn.training for bn in _batchnorms(model.rspg))
        query, supports, masks, target, class_ids = episode()
        for _ in range(2):
            out = net(query, supports, masks, class_ids)
            loss = F.cross_entropy(out["logits"], target) + sum(F.cross_entropy(o, target) for o in out["aux_logits"])
            loss.backward()
        assert all(p.grad is not None for p in model.decoder.parameters())
    finally:
        dist.destroy_process_group()
