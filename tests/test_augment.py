"""Stage-2 augmentation (fasttrain.data.augment): batched torch ops on uint8 images, no data files."""
import colorsys

import numpy as np
import pytest
import torch
from data_prep_fixtures import resize_center_crop

from fasttrain.data import augment as A

MEAN, STD = [120.0, 110.0, 100.0], [60.0, 50.0, 40.0]


def images(n=16, h=20, w=24, c=3, seed=0):
    return torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def unnormalize(y, mean=MEAN, std=STD):
    return y * A.stats(std, "cpu") + A.stats(mean, "cpu")


def test_presets():
    assert A.small_train() == A.ViewSpec(crop="pad", pad=4, flip=True)
    assert A.small_eval() == A.ViewSpec()
    assert A.large_train(160) == A.ViewSpec(crop="rrc", size=160, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                            flip=True)
    assert A.large_eval(224) == A.ViewSpec(crop="center", size=224, center_ratio=0.875)
    moco = A.moco_v2(224)
    assert (moco.crop, moco.size, moco.scale, moco.flip) == ("rrc", 224, (0.2, 1.0), True)
    assert (moco.jitter, moco.jitter_p, moco.grayscale_p, moco.blur_p, moco.blur_sigma) == \
        ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, (0.1, 2.0))
    assert A.large_train(96).after_decode() == A.ViewSpec(crop="none", size=96)
    with pytest.raises(ValueError, match="crop"):
        A.ViewSpec(crop="random")
    with pytest.raises(ValueError, match="size"):
        A.ViewSpec(crop="rrc")


def test_eval_view_is_exactly_normalization_in_any_layout():
    x = images()
    expected = (x.permute(0, 3, 1, 2).float() - A.stats(MEAN, "cpu")) / A.stats(STD, "cpu")
    y = A.apply(A.small_eval(), x, gen(), MEAN, STD)
    assert y.dtype == torch.float32 and y.is_contiguous() and torch.equal(y, expected)
    y_cl = A.apply(A.small_eval(), x, gen(), MEAN, STD, channels_last=True)
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(y_cl, expected)
    y_nchw = A.apply(A.small_eval(), x.permute(0, 3, 1, 2).contiguous(), gen(), MEAN, STD, layout="NCHW")
    assert torch.equal(y_nchw, expected)


def test_pad_crop_flip_takes_a_window_of_the_zero_padded_image():
    x = images(n=32, h=8, w=8)
    y = unnormalize(A.apply(A.small_train(), x, gen(), MEAN, STD)).round()
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2).float(), (4, 4, 4, 4))
    flips_seen = set()
    for i in range(len(x)):
        matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                   if torch.equal(y[i], (lambda w: w.flip(2) if f else w)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"image {i} is not a window of the padded input"
        flips_seen.update(m[2] for m in matches)
    assert flips_seen == {False, True}


def test_randomness_comes_only_from_the_generator_and_input_is_untouched():
    x = images()
    before = x.clone()
    for spec in (A.small_train(), A.moco_v2(16), A.ViewSpec(flip=True)):
        a, b = A.apply(spec, x, gen(5), MEAN, STD), A.apply(spec, x, gen(5), MEAN, STD)
        assert torch.equal(a, b)
        assert not torch.equal(a, A.apply(spec, x, gen(6), MEAN, STD))
    assert torch.equal(x, before)


def test_rrc_boxes_respect_scale_ratio_and_bounds():
    sizes = torch.tensor([[40, 60], [100, 30], [8, 8], [300, 500]]).repeat(50, 1)
    spec = A.large_train(32)
    boxes = A.crop_boxes(spec, sizes, gen())
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()
    area = h * w / (sizes[:, 0] * sizes[:, 1])
    assert area.max() <= 1.0 and area.min() >= 0.08 * 0.8                   # rounding of tiny crops
    big = sizes[:, 0] >= 100
    assert ((w / h)[big] >= 0.7).all() and ((w / h)[big] <= 1.4).all()


def test_center_boxes_are_torchvisions_resize_then_center_crop():
    # size 64, ratio 0.875: Resize(73). 100 x 200 -> 73 x 146, window at (4, 41); 81 x 40 -> 147 x 73, (42, 4)
    boxes = A.crop_boxes(A.large_eval(64), torch.tensor([[100, 200], [81, 40]]), gen())
    expected = [[4 * 100 / 73, 41 * 200 / 146, 64 * 100 / 73, 64 * 200 / 146],
                [42 * 81 / 147, 4 * 40 / 73, 64 * 81 / 147, 64 * 40 / 73]]
    np.testing.assert_allclose(boxes.numpy(), expected, rtol=1e-12)
    from PIL import Image        # resizing the box of the whole image = resizing the image, then cropping
    rng = np.random.default_rng(0)
    for h, w in ((375, 500), (600, 800), (333, 500), (500, 281)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        top, left, bh, bw = A.crop_boxes(A.large_eval(224), torch.tensor([[h, w]]), gen())[0].tolist()
        got = np.asarray(img.resize((224, 224), Image.BILINEAR, box=(left, top, left + bw, top + bh)), np.float64)
        assert np.abs(got - resize_center_crop(img, 256, 224)).max() <= 1


def test_resized_crop_of_the_whole_image_is_identity_or_mirror():
    x = images(h=12, w=12)
    spec = A.ViewSpec(crop="rrc", size=12, scale=(1, 1), ratio=(1, 1), flip=True)
    y = unnormalize(A.apply(spec, x, gen(), MEAN, STD))
    ref = x.permute(0, 3, 1, 2).float()
    mirrored = [torch.allclose(y[i], ref[i].flip(2), atol=1e-3) for i in range(len(x))]
    same = [torch.allclose(y[i], ref[i], atol=1e-3) for i in range(len(x))]
    assert all(a or b for a, b in zip(mirrored, same)) and any(mirrored) and any(same)


def test_center_crop_of_a_padded_canvas_uses_each_images_valid_region():
    x = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    x[0, :8, :8] = 200                                   # an 8x8 image in a 16x16 canvas
    x[1] = 50
    y = unnormalize(A.apply(A.ViewSpec(crop="center", size=4, center_ratio=1.0), x, gen(), MEAN, STD,
                            sizes=torch.tensor([[8, 8], [16, 16]])))
    assert torch.allclose(y[0], torch.full_like(y[0], 200), atol=1e-3)
    assert torch.allclose(y[1], torch.full_like(y[1], 50), atol=1e-3)


def test_hue_shift_matches_colorsys():
    x = torch.rand(1, 3, 5, 5) * 255
    shifted = A._shift_hue(x, torch.tensor([0.3]))
    for i in range(5):
        r, g, b = (x[0, :, 0, i] / 255).tolist()
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        np.testing.assert_allclose(np.array(colorsys.hsv_to_rgb((h + 0.3) % 1, s, v)) * 255,
                                   shifted[0, :, 0, i].numpy(), atol=1e-3)


def test_color_ops_at_probability_one():
    x = images(n=8)
    gray = A.apply(A.ViewSpec(grayscale_p=1.0), x, gen(), [0] * 3, [1] * 3)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    dark = A.apply(A.ViewSpec(jitter=(0.5, 0, 0, 0), jitter_p=1.0), x, gen(), [0] * 3, [1] * 3)
    ratio = dark.sum((1, 2, 3)) / x.float().sum((1, 2, 3))
    assert ((ratio > 0.45) & (ratio < 1.5)).all() and not torch.allclose(ratio, torch.ones(8))
    flat = torch.full((4, 16, 16, 3), 90, dtype=torch.uint8)
    blurred = A.apply(A.ViewSpec(blur_p=1.0), flat, gen(), [0] * 3, [1] * 3)
    assert torch.allclose(blurred, torch.full_like(blurred, 90), atol=1e-3)
    sharp = images(n=4, h=32, w=32)
    assert A.apply(A.ViewSpec(blur_p=1.0), sharp, gen(), [0] * 3, [1] * 3).std() < sharp.float().std()


def test_probability_zero_ops_are_identity():
    x = images()
    spec = A.ViewSpec(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    assert torch.equal(A.apply(spec, x, gen(), MEAN, STD), A.apply(A.small_eval(), x, gen(), MEAN, STD))


@pytest.mark.parametrize("channels", [1, 3])
def test_moco_view_shape_and_range(channels):
    x = images(c=channels)
    mean, std = MEAN[:channels], STD[:channels]
    y = A.apply(A.moco_v2(12), x, gen(), mean, std, channels_last=True)
    assert y.shape == (16, channels, 12, 12) and y.dtype == torch.float32 and torch.isfinite(y).all()
    pixels = unnormalize(y, mean, std)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    assert y.is_contiguous(memory_format=torch.channels_last)

