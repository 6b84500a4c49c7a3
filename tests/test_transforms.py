"""Transforms keep image and masks aligned; the evaluation resize is exactly the original's."""
import cv2
import numpy as np
import pytest
import torch

from util.transforms import (RandCrop, RandFlip, RandRotate, RandScale, ValResize, pad_label_square, resized_hw,
                             train_transform, val_transform)

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def marked_pair(h=90, w=120):
    """An image whose red channel is 250 exactly where the mask is 1 (a rectangle), a second
    mask that marks the rectangle's left half with 7."""
    image = np.full((h, w, 3), 10.0, np.float32)
    target = np.zeros((h, w), np.uint8)
    target[20:60, 30:70] = 1
    second = np.zeros((h, w), np.uint8)
    second[20:60, 30:50] = 7
    image[..., 0][target == 1] = 250.0
    return image, [target, second]


def assert_aligned(image, masks, ignore=255):
    red = image[..., 0]
    inside = masks[0] == 1
    outside = masks[0] == 0
    # Interpolation smears one or two pixels at the boundary: compare away from it.
    kernel = np.ones((5, 5), np.uint8)
    core_in = cv2.erode(inside.astype(np.uint8), kernel) > 0
    core_out = cv2.erode(outside.astype(np.uint8), kernel) > 0
    assert core_in.sum() > 0
    assert red[core_in].min() > 200, "image and target mask misaligned"
    assert red[core_out].max() < 60, "image and target mask misaligned"
    # the second mask moved with the first: its 7s lie inside the target's rectangle
    assert np.all(masks[0][masks[1] == 7] == 1)


@pytest.mark.parametrize("op", [
    RandFlip(1.0),
    RandRotate([25, 25], 1.0, fill=MEAN),
    RandScale([1.7, 1.7]),
    RandScale([0.6, 0.6]),
    RandCrop(64, fill=MEAN),
    RandCrop(150, fill=MEAN),
])
def test_ops_keep_image_and_masks_aligned(op):
    image, masks = marked_pair()
    out_image, out_masks = op(image, masks, np.random.default_rng(0))
    assert out_image.shape[:2] == out_masks[0].shape == out_masks[1].shape
    assert_aligned(out_image, out_masks)


def test_flip_is_exact():
    image, masks = marked_pair()
    out_image, out_masks = RandFlip(1.0)(image, masks, np.random.default_rng(0))
    assert np.array_equal(out_masks[0], masks[0][:, ::-1]) and np.array_equal(out_image, image[:, ::-1])


def test_rotation_borders_are_mean_and_ignore():
    image, masks = marked_pair()
    out_image, out_masks = RandRotate([30, 30], 1.0, fill=MEAN)(image, masks, np.random.default_rng(0))
    assert out_masks[0][0, 0] == 255 and out_masks[1][0, 0] == 255
    assert np.allclose(out_image[0, 0], MEAN, atol=1e-3)


def test_crop_pads_centrally_with_mean_and_ignore():
    image, masks = marked_pair(40, 50)
    out_image, out_masks = RandCrop(60, fill=MEAN)(image, masks, np.random.default_rng(0))
    # 20 rows / 10 columns of padding split evenly: the original image sits at [10:50, 5:55]
    assert out_masks[0].shape == (60, 60)
    assert np.all(out_masks[0][:10] == 255) and np.all(out_masks[0][50:] == 255)
    assert np.all(out_masks[0][:, :5] == 255) and np.all(out_masks[0][:, 55:] == 255)
    assert np.allclose(out_image[0, 0], MEAN, atol=1e-3)
    assert np.array_equal(out_masks[0][10:50, 5:55], masks[0])


def test_crop_keeps_most_of_the_foreground():
    image = np.zeros((200, 200, 3), np.float32)
    target = np.zeros((200, 200), np.uint8)
    target[120:160, 120:160] = 1   # most random 100-crops cut this object
    kept = []
    for seed in range(40):
        _, (mask,) = RandCrop(100, fill=MEAN)(image, [target], np.random.default_rng(seed))
        kept.append((mask == 1).sum() / 1600)
    assert np.mean([k >= 0.85 for k in kept]) > 0.9
    # without re-drawing, most crops would lose the object
    lost = []
    for seed in range(40):
        _, (mask,) = RandCrop(100, fill=MEAN, redraws=0)(image, [target], np.random.default_rng(seed))
        lost.append((mask == 1).sum() / 1600 < 0.85)
    assert np.mean(lost) > 0.3


@pytest.mark.parametrize("h,w,size,expected", [
    (375, 500, 473, (352, 472)),   # 375 * 473 / 500 = 354.75 -> 354 -> 352; 473 -> 472
    (500, 333, 473, (472, 312)),   # 333 * 0.946 = 315.0 -> 315 -> 312
    (100, 100, 473, (472, 472)),   # smaller images are scaled up too (the original's Resize)
    (129, 64, 129, (128, 64)),
])
def test_val_resize_floors_to_multiple_of_8(h, w, size, expected):
    assert resized_hw(h, w, size) == expected


def test_val_transform_zero_canvas_and_ignore_padding():
    image, masks = marked_pair(90, 120)
    tensor, (mask,) = val_transform(size=129, mean=MEAN, std=STD)(image, masks[:1])
    new_h, new_w = resized_hw(90, 120, 129)
    assert tensor.shape == (3, 129, 129) and mask.shape == (129, 129)
    zero = (torch.zeros(3) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(tensor[:, -1, -1], zero)                      # zero canvas, not mean
    assert torch.all(mask[new_h:] == 255) and torch.all(mask[:, new_w:] == 255)
    assert set(mask[:new_h, :new_w].unique().tolist()) == {0, 1}


def test_train_transform_output_and_determinism():
    image, masks = marked_pair()
    transform = train_transform(crop_size=65, scale_range=[0.9, 1.1], rotate_range=[-10, 10], rotate_prob=0.5,
                                blur_prob=0.5, flip_prob=0.5, mean=MEAN, std=STD)
    a = transform(image, masks, np.random.default_rng(3))
    b = transform(image, masks, np.random.default_rng(3))
    assert a[0].shape == (3, 65, 65) and a[1][0].dtype == torch.long
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][1], b[1][1])
    assert set(a[1][0].unique().tolist()) <= {0, 1, 255}


def test_pad_label_square():
    label = np.ones((3, 5), np.uint8)
    square = pad_label_square(label)
    assert square.shape == (5, 5) and np.all(square[:3] == 1) and np.all(square[3:] == 255)
