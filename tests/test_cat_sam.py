"""CAT-SAM model tests (CPU, small networks): parameter counts, frozen SAM, the prompt-token
attention, activation checkpointing, encoder reuse, pre/post-processing, loss, checkpoints."""
from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402
from segment_anything.modeling.image_encoder import Attention  # noqa: E402

from model.cat_sam import CATSAM, CATSAMPredictor, canonical_key  # noqa: E402
from model.cat_sam_encoder import attention_with_token  # noqa: E402
from model.cat_sam_loss import cat_sam_loss, dice_loss  # noqa: E402
from util.cat_sam_checkpoint import load_cat_sam_checkpoint  # noqa: E402
from util.checkpoint import CheckpointError  # noqa: E402

# A small CAT-SAM: 128 x 128 input, 8 x 8 tokens, windows of 4 (block 0), global block 1.
SMALL = dict(sam_type="tiny", embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), img_size=128,
             patch_size=16, window_size=4, out_chans=64)


def small(variant="a", seed=0, **kwargs) -> CATSAM:
    torch.manual_seed(seed)
    model = CATSAM(variant=variant, **{**SMALL, **kwargs})
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():     # non-trivial relative positions (SAM initialises them to zero)
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def image(h=96, w=120, seed=0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


BOXES = torch.tensor([[10., 12., 60., 70.], [50., 20., 110., 90.]])
TARGETS = torch.zeros(2, 1, 96, 120)
TARGETS[0, :, 12:70, 10:60] = 1
TARGETS[1, :, 20:90, 50:110] = 1


# --------------------------------------------------------------------------------------------
# Parameter counts (SPEC_CAT_SAM 4), constructed only
# --------------------------------------------------------------------------------------------

def _count(model, prefix):
    return sum(p.numel() for n, p in model.named_trainable_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("variant, trainable, keys, parts", [
    ("t", 1_867_520, 582, {"image_encoder.hq_token_proj.": 796_416}),
    ("a", 1_466_960, 614, {"image_encoder.prompt_generator.": 63_312, "image_encoder.hq_token_down_proj.": 197_376,
                           "image_encoder.shared_up_proj.": 135_168}),
])
def test_vit_b_trainable_counts(variant, trainable, keys, parts):
    model = CATSAM(variant=variant, sam_type="vit_b")
    params = list(model.parameters())                        # each tensor once (the CAT token shared)
    assert sum(p.numel() for p in params if p.requires_grad) == trainable
    assert sum(p.numel() for p in params if not p.requires_grad) == 93_735_472
    assert sum(p.numel() for p in model.trainable_parameters()) == trainable
    assert len(model.state_dict()) == keys
    common = {"mask_decoder.hf_token.": 256, "mask_decoder.hf_mlp.": 139_808,
              "mask_decoder.compress_vit_feat.": 820_000, "mask_decoder.embedding_encoder.": 73_952,
              "mask_decoder.embedding_maskfeature.": 37_088}
    for prefix, count in {**common, **parts}.items():
        assert _count(model, prefix) == count, prefix
    assert model.image_encoder.hq_token is model.mask_decoder.hf_token.weight


def test_baseline_variants_trainable_parts():
    zero = small("zero_shot")
    assert not any(p.requires_grad for p in zero.parameters())
    assert not any(k.startswith("mask_decoder.hf_") or k == "image_encoder.hq_token" for k in zero.state_dict())
    dec = small("decoder_only")
    names = [n for n, _ in dec.named_trainable_parameters()]
    assert names and all(n.startswith("mask_decoder.") for n in names)
    assert "image_encoder.hq_token" not in dec.state_dict()


# --------------------------------------------------------------------------------------------
# Frozen SAM, gradients
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["t", "a", "decoder_only"])
def test_frozen_tensors_get_no_grad(variant):
    model = small(variant).train()
    assert not model.ori_sam.training and not model.mask_decoder.transformer.training
    assert model.mask_decoder.training and model.image_encoder.training
    frozen_before = {k: v.clone() for k, v in model.canonical_state_dict().items()
                     if not k.startswith(("mask_decoder.hf_", "mask_decoder.compress", "mask_decoder.embedding_",
                                          "image_encoder.hq_", "image_encoder.prompt_", "image_encoder.shared_"))}
    logits = model(images=[image()], boxes=[BOXES])
    total, _ = cat_sam_loss(logits, [TARGETS])
    total.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=1e-4)
    optimizer.step()
    state = model.canonical_state_dict()
    for key, value in frozen_before.items():
        assert torch.equal(state[key], value), key


def test_cat_token_gets_gradient_from_encoder_and_decoder():
    """The bridge makes the CAT token's gradient differ from its decoder-only gradient."""
    model = small("a").train()
    loss, _ = cat_sam_loss(model(images=[image()], boxes=[BOXES]), [TARGETS])
    token = model.mask_decoder.hf_token.weight
    total_grad = torch.autograd.grad(loss, token)[0]
    feats = model.embed([image()])
    feats.image_embeddings = feats.image_embeddings.detach()
    feats.interm_embeddings = [t.detach() for t in feats.interm_embeddings]
    loss_dec, _ = cat_sam_loss(model(features=feats, boxes=[BOXES]), [TARGETS])
    decoder_grad = torch.autograd.grad(loss_dec, token)[0]
    assert (total_grad - decoder_grad).abs().max() > 1e-6 * total_grad.abs().max()


# --------------------------------------------------------------------------------------------
# CAT-SAM-T attention, activation checkpointing
# --------------------------------------------------------------------------------------------

def _naive_token_attention(attn: Attention, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The spec's recipe literally: token first, full (1 + n) x (1 + n) attention, rel-pos bias
    only between spatial tokens, drop the token's output row."""
    b, h, w, c = x.shape
    n = h * w
    seq = torch.cat([token.expand(b, 1, c), x.reshape(b, n, c)], 1)
    qkv = attn.qkv(seq).reshape(b, 1 + n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                                 # b x heads x (1+n) x d
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    bias = torch.zeros_like(scores)
    hd = q.shape[-1]
    for qi in range(n):
        for ki in range(n):
            (qy, qx), (ky, kx) = divmod(qi, w), divmod(ki, w)
            rh = attn.rel_pos_h[qy - ky + h - 1]
            rw = attn.rel_pos_w[qx - kx + w - 1]
            bias[:, :, 1 + qi, 1 + ki] = (q[:, :, 1 + qi] * (rh + rw).view(1, 1, hd)).sum(-1)
    out = (scores + bias).softmax(-1) @ v
    out = out[:, :, 1:].permute(0, 2, 1, 3).reshape(b, h, w, -1)
    return attn.proj(out)


def test_token_attention_matches_the_literal_recipe():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, use_rel_pos=True, input_size=(3, 3))
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    x, token = torch.randn(2, 3, 3, 32), torch.randn(1, 1, 32)
    assert torch.allclose(attention_with_token(attn, x, token), _naive_token_attention(attn, x, token), atol=1e-5)


@pytest.mark.parametrize("variant,attention", [("t", "reference"), ("a", "reference"), ("t", "sdpa"), ("a", "sdpa")])
def test_checkpointed_encoder_gives_the_same_gradients(variant, attention, monkeypatch):
    import model.attention as attention_module
    # several query chunks per attention call, so that each chunk's recomputation is exercised
    monkeypatch.setattr(attention_module, "MAX_BIAS_ELEMENTS", 1024)
    grads = []
    for flag in (False, True):
        model = small(variant, checkpoint_encoder=flag, attention=attention).train()
        blocks = model.image_encoder.sam_img_encoder.blocks
        # global-attention blocks recompute their attention chunks, windowed blocks the whole block
        assert [bool(getattr(b.attn, "checkpoint_chunks", False)) for b in blocks] == \
            [flag and b.window_size == 0 for b in blocks]
        assert all(isinstance(b.attn, attention_module.SDPAAttention) == (attention == "sdpa") for b in blocks)
        loss, _ = cat_sam_loss(model(images=[image()], boxes=[BOXES]), [TARGETS])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_trainable_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-5, atol=1e-7 * grad.abs().max()), name


def test_sdpa_attention_matches_reference():
    ref, sdpa = small("a"), small("a", attention="sdpa")
    with torch.no_grad():
        a = ref(images=[image()], boxes=[BOXES])[0]
        b = sdpa(images=[image()], boxes=[BOXES])[0]
    assert (a - b).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# Encoder once per image; API shapes; pre/post-processing
# --------------------------------------------------------------------------------------------

def _count_encoded_images(model):
    calls = []
    model.ori_sam.image_encoder.patch_embed.register_forward_hook(lambda m, inp, out: calls.append(out.shape[0]))
    return calls


@pytest.mark.parametrize("variant", ["t", "a", "zero_shot"])
def test_encoder_runs_once_per_image(variant):
    model = small(variant).eval()
    calls = _count_encoded_images(model)
    predictor = CATSAMPredictor(model)
    predictor.set_image(image())
    for _ in range(3):
        masks, logits = predictor.predict(boxes=BOXES)
        assert masks.shape == logits.shape == (2, 1, 96, 120) and masks.dtype == torch.bool
    predictor.predict(points=torch.tensor([[[30., 40.]], [[80., 50.]]]))
    empty_masks, empty_logits = predictor.predict()
    union = predictor.predict_union(BOXES)
    assert union.shape == (96, 120) and torch.equal(union, masks.any(0)[0])
    assert torch.equal(predictor.predict_union(torch.zeros(0, 4)), empty_masks[0, 0])
    assert calls == [1]
    calls.clear()
    with torch.no_grad():
        out = model(images=[image(), image(64, 80, seed=1)], boxes=[BOXES, BOXES[:1] / 2])
    assert calls == [2]                        # one batched pass for the two images, not one per prompt
    assert [tuple(o.shape) for o in out] == [(2, 1, 96, 120), (1, 1, 64, 80)]


def test_forward_prompt_kinds_and_shapes():
    model = small("a").train()
    img1, img2 = image(), image(130, 70, seed=2)
    points = [torch.tensor([[[30., 40.]], [[80., 50.]]]), None]
    labels = [torch.ones(2, 1, dtype=torch.long), None]
    masks = [None, torch.zeros(3, 130, 70)]                         # mask prompt at the image's size
    out = model(images=[img1, img2], points=points, point_labels=labels, noisy_masks=masks)
    assert [tuple(o.shape) for o in out] == [(2, 1, 96, 120), (3, 1, 130, 70)]
    low = model(images=[img1], noisy_masks=[torch.ones(2, 1, 32, 32)])[0]     # mask prompt in SAM's 4g frame
    assert low.shape == (2, 1, 96, 120)
    both = model(images=[img1], boxes=[BOXES], points=points[:1])[0]
    assert both.shape == (2, 1, 96, 120)
    empty = model(images=[img1])[0]                                 # no prompt: one empty prompt
    assert empty.shape == (1, 1, 96, 120)
    with pytest.raises(ValueError, match="disagree"):
        model(images=[img1], boxes=[BOXES], points=[torch.zeros(3, 1, 2)])
    with pytest.raises(ValueError, match="entries"):
        model(images=[img1], boxes=[BOXES, BOXES])


def test_image_at_input_size_is_normalised():
    """SPEC_CAT_SAM 13 defect fixed: an image already S x S is normalised like any other."""
    model = small("a")
    img = image(128, 128)
    expected = (img - model.pixel_mean) / model.pixel_std
    assert torch.allclose(model.preprocess(img), expected)
    small_img = image(64, 64)
    resized = F.interpolate(small_img[None], size=(128, 128), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(model.preprocess(small_img), (resized - model.pixel_mean) / model.pixel_std, atol=1e-5)


def test_squash_prompt_coordinates_are_scaled_and_rounded():
    model = small("a")
    feats = model.embed([image(96, 120)])
    scaled = model._scale_coords(torch.tensor([[[10., 12.], [60., 70.]]]), 0, feats)
    assert torch.equal(scaled, torch.round(torch.tensor([[[10 * 128 / 120, 12 * 128 / 96],
                                                           [60 * 128 / 120, 70 * 128 / 96]]])))


def _segment_anything_sam(model: CATSAM) -> Sam:
    """segment-anything's Sam with the model's numbers (SAM's registry, tiny sizes)."""
    enc = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4,
                          out_chans=64, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                          use_rel_pos=True, global_attn_indexes=(1,), window_size=4)
    prompt = PromptEncoder(embed_dim=64, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=64, mlp_dim=2048, num_heads=8), transformer_dim=64, iou_head_depth=3,
        iou_head_hidden_dim=256)
    return Sam(image_encoder=enc, prompt_encoder=prompt, mask_decoder=decoder).eval()


def test_zero_shot_is_segment_anything(tmp_path):
    """A SAM file loads into the SAM part; zero-shot CATSAM with SAM's geometry = segment-anything's Sam."""
    torch.manual_seed(3)
    sam = _segment_anything_sam(small("zero_shot"))
    with torch.no_grad():
        for name, p in sam.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(sam.state_dict(), path)
    model = small("zero_shot", resize="longest_side").eval()
    report = load_cat_sam_checkpoint(model, path)
    assert report.format == "sam"
    img = image(96, 128)                                     # longest side = S: no resize, bottom padding
    boxes = torch.tensor([[10., 12., 60., 70.], [50., 20., 110., 90.]])
    with torch.no_grad():
        ours = model(images=[img], boxes=[boxes])[0]
        ref = sam([{"image": img, "original_size": (96, 128), "boxes": boxes}], multimask_output=False)[0]
        ref_logits = sam.postprocess_masks(ref["low_res_logits"], (96, 128), (96, 128))
    assert (ours - ref_logits).abs().max() < 1e-4
    assert torch.equal(ours > 0, ref["masks"])


def test_longest_side_mode_shapes():
    model = small("t", resize="longest_side").eval()
    with torch.no_grad():
        feats = model.embed([image(50, 200)])
        assert feats.input_sizes == [(32, 128)]
        out = model(features=feats, boxes=[torch.tensor([0., 0., 100., 40.])],
                    noisy_masks=[torch.zeros(1, 50, 200)])[0]
    assert out.shape == (1, 1, 50, 200)


def test_predictor_needs_an_image():
    with pytest.raises(RuntimeError, match="set_image"):
        CATSAMPredictor(small("a")).predict(boxes=BOXES)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

def test_loss_terms():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 1, 5, 6, generator=gen), torch.randn(1, 1, 4, 4, generator=gen)]
    targets = [(torch.rand(2, 5, 6, generator=gen) > 0.5).float(), torch.zeros(1, 1, 4, 4)]
    total, parts = cat_sam_loss(logits, targets)
    bce = [F.binary_cross_entropy_with_logits(logits[0], targets[0][:, None]),
           F.binary_cross_entropy_with_logits(logits[1], targets[1])]
    dice = []
    for out, t in zip(logits, [targets[0][:, None], targets[1]]):
        per_object = []
        for j in range(out.shape[0]):
            p = out[j].sigmoid()
            per_object.append(1 - (2 * (p * t[j]).sum() + 1) / (p.sum() + t[j].sum() + 1))
        dice.append(torch.stack(per_object).mean())
    assert math.isclose(parts["loss_bce"].item(), (sum(bce) / 2).item(), rel_tol=1e-6)
    assert math.isclose(parts["loss_dice"].item(), (sum(dice) / 2).item(), rel_tol=1e-6)
    assert parts["loss"].item() == total.item() and not parts["loss"].requires_grad
    assert torch.allclose(dice_loss(logits[1], targets[1]), dice[1])
    with pytest.raises(ValueError):
        cat_sam_loss(logits, targets[:1])


# --------------------------------------------------------------------------------------------
# Checkpoints (util.cat_sam_checkpoint)
# --------------------------------------------------------------------------------------------

def _official_file(model: CATSAM, path: Path, wrap=True, prefix="") -> Path:
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}     # full, aliases included
    torch.save({"model": state} if wrap else state, path)
    return path


@pytest.mark.parametrize("wrap, prefix", [(True, ""), (False, "module.")])
def test_official_checkpoint_round_trip(tmp_path, wrap, prefix):
    source = small("t", seed=1)
    path = _official_file(source, tmp_path / "kvasir_cat-t_vit-tiny_1shot.pth", wrap, prefix)
    target = small("t", seed=2)
    report = load_cat_sam_checkpoint(target, path)
    assert report.format == "cat_sam"
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    canonical = tmp_path / "canonical.pth"
    torch.save(source.canonical_state_dict(), canonical)
    load_cat_sam_checkpoint(small("t", seed=3), canonical)


def test_checkpoint_of_another_variant_is_refused_by_name(tmp_path):
    path = _official_file(small("t"), tmp_path / "sbu_cat-t.pth")
    with pytest.raises(CheckpointError, match=r"CAT-SAM-T checkpoint.*the model is CAT-SAM-A"):
        load_cat_sam_checkpoint(small("a"), path)
    path = _official_file(small("decoder_only"), tmp_path / "hq.pth")
    with pytest.raises(CheckpointError, match=r"decoder-only .*CAT-SAM-T"):
        load_cat_sam_checkpoint(small("t"), path)


def test_checkpoint_of_another_sam_size_is_refused_by_name(tmp_path):
    vit_b = CATSAM(variant="a", sam_type="vit_b", img_size=128, window_size=4)
    path = _official_file(vit_b, tmp_path / "whu_cat-a_vit-b.pth")
    with pytest.raises(CheckpointError, match=r"SAM vit_b.*CAT-SAM-A \(tiny\) with SAM tiny"):
        load_cat_sam_checkpoint(small("a"), path)
    sam_file = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({k[len("ori_sam."):] if k.startswith("ori_sam.") else k: v
                for k, v in vit_b.canonical_state_dict().items()
                if k.startswith("ori_sam.") or k.startswith("mask_decoder.") and "hf_" not in k
                and "compress" not in k and "embedding_" not in k}, sam_file)
    with pytest.raises(CheckpointError, match=r"SAM checkpoint is for SAM vit_b.*SAM tiny"):
        load_cat_sam_checkpoint(small("a"), sam_file)
    load_cat_sam_checkpoint(CATSAM(variant="t", sam_type="vit_b", img_size=128, window_size=4), sam_file)


@pytest.mark.parametrize("alias", ["image_encoder.sam_img_encoder.blocks.0.attn.qkv.weight",
                                   "prompt_encoder.sam_prompt_encoder.no_mask_embed.weight",
                                   "image_encoder.hq_token"])
def test_alias_mismatch_is_refused(tmp_path, alias):
    model = small("a")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[alias] = state[alias] + 1.0
    path = tmp_path / "tampered.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"do not agree[\s\S]*" + alias.replace(".", r"\.")):
        load_cat_sam_checkpoint(small("a"), path)
    assert canonical_key(alias) in state


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = {k: v.clone() for k, v in small("a").state_dict().items()}
    del state["mask_decoder.hf_mlp.layers.0.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"missing[\s\S]*hf_mlp\.layers\.0\.weight[\s\S]*unexpected"):
        load_cat_sam_checkpoint(small("a"), path)
