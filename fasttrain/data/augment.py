"""View specs and stage 2 of every loader: batched, vectorized augmentation in torch on the device.

Stage 1 (the backend: FFCV, DALI, PIL) decodes; for jpeg sets it also does the spatial part of a view
(the crop and the flip). Stage 2 (`apply`) does the rest, in this fixed order:

    crop (raw sets: pad-crop, RandomResizedCrop or center crop) -> flip -> color jitter
    (brightness, contrast, saturation, hue: always this order) -> grayscale -> gaussian blur -> normalize

All random parameters are drawn from a `torch.Generator` in that order (only for the ops a view has), on the
generator's device: the loaders give a generator on the training device, so no draw needs a host-to-device
copy or a synchronisation, and a batch is a pure function of (input, generator seed) on a given device kind
(CUDA and CPU generators give different streams). Nothing here reads a value back to the host.
A view whose stage 2 is only normalization draws nothing, so a backend may finish it itself (the FFCV
loader does on the CPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CROPS = ("none", "pad", "rrc", "center")
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view. `crop`: none | pad (zero-pad `pad` then random crop back to H x W) |
    rrc (RandomResizedCrop to `size`) | center (torchvision's Resize(round(size / center_ratio)) +
    CenterCrop(size), e.g. the paper's Resize(256) + CenterCrop(224); see `crop_boxes`)."""
    crop: str = "none"
    size: int | None = None
    pad: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    center_ratio: float = 0.875
    flip: bool = False
    jitter: tuple[float, float, float, float] | None = None   # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"ViewSpec.crop must be one of {CROPS}, got {self.crop!r}")
        if self.crop in ("rrc", "center") and not self.size:
            raise ValueError(f"ViewSpec(crop={self.crop!r}) needs an output size")

    @property
    def resizes(self) -> bool:
        """Crop + resize to `size`: what a jpeg backend does while decoding."""
        return self.crop in ("rrc", "center")

    @property
    def has_color_ops(self) -> bool:
        return (self.jitter is not None and self.jitter_p > 0) or self.grayscale_p > 0 or self.blur_p > 0

    def after_decode(self) -> ViewSpec:
        """What stage 2 still has to do after a jpeg backend decoded, cropped and flipped."""
        return replace(self, crop="none", flip=False)


def small_train() -> ViewSpec:
    return ViewSpec(crop="pad", pad=4, flip=True)


def small_eval() -> ViewSpec:
    return ViewSpec()


def large_train(size: int) -> ViewSpec:
    return ViewSpec(crop="rrc", size=size, flip=True)


def large_eval(size: int) -> ViewSpec:
    return ViewSpec(crop="center", size=size)


def moco_v2(size: int) -> ViewSpec:
    return ViewSpec(crop="rrc", size=size, scale=(0.2, 1.0), flip=True, jitter=(0.4, 0.4, 0.4, 0.1),
                    jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)


def stats(values: Sequence[float], device) -> torch.Tensor:
    """Per-channel mean or std as a 1 x C x 1 x 1 float tensor on `device` (build once per loader)."""
    return torch.as_tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def apply(spec: ViewSpec, images: torch.Tensor, generator: torch.Generator,
          mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float],
          channels_last: bool = False, *, layout: str = "NHWC",
          sizes: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images (N x H x W x C, or N x C x H x W with layout='NCHW') -> normalized float32 N x C x H x W
    on the images' device, channels_last memory format if asked. The input is never modified.

    `mean`/`std`: per channel, 0-255 scale (`stats` tensors save a host-to-device copy per batch).
    `sizes` (N x 2: height, width) marks the valid top-left region of each image in a padded canvas
    (device loader on jpeg sets); default: the whole image.
    """
    x = images if layout == "NHWC" else images.permute(0, 2, 3, 1)
    n, h, w, c = x.shape
    mean, std = (v if isinstance(v, torch.Tensor) else stats(v, x.device) for v in (mean, std))
    draw = _Draws(generator, n)
    flip = draw.coin(0.5) if spec.flip else None
    if spec.crop == "pad":
        x = _pad_crop(x, spec.pad, draw, flip)
    elif spec.resizes:
        if sizes is None:
            sizes = torch.stack([torch.full((n,), side, dtype=torch.int64, device=generator.device)
                                 for side in (h, w)], 1)
        x = _resized_crop(x, crop_boxes(spec, sizes, generator).to(x.device), spec.size, flip)
    elif flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if x.dtype == torch.uint8:
        x = _new_float(x.shape, x.device, channels_last).copy_(x.permute(0, 3, 1, 2))
    if spec.jitter is not None and spec.jitter_p > 0:
        x = _color_jitter(x, spec.jitter, draw.coin(spec.jitter_p), draw)
    if spec.grayscale_p > 0 and c == 3:
        x = torch.where(draw.coin(spec.grayscale_p).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    if spec.blur_p > 0:
        x = _gaussian_blur(x, draw.coin(spec.blur_p), draw.uniform(*spec.blur_sigma))
    return x.sub_(mean).div_(std).contiguous(memory_format=fmt)


def _new_float(nhwc_shape, device, channels_last: bool) -> torch.Tensor:
    """An uninitialised float32 N x C x H x W tensor. On the CPU it is numpy-allocated: numpy asks the
    kernel for huge pages, which makes first writes to a large batch about twice as fast as torch.empty."""
    n, h, w, c = nhwc_shape
    if device.type != "cpu":
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty((n, c, h, w), device=device, memory_format=fmt)
    if channels_last:
        return torch.from_numpy(np.empty((n, h, w, c), np.float32)).permute(0, 3, 1, 2)
    return torch.from_numpy(np.empty((n, c, h, w), np.float32))


def crop_boxes(spec: ViewSpec, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The crop boxes of a resizing view (N x 4 float64: top, left, height, width) for images of
    `sizes` (N x 2: height, width); random ones are drawn from `generator`. Center boxes are fractional:
    resized to size x size they give torchvision's Resize + CenterCrop of the whole image."""
    if spec.crop == "rrc":
        return _rrc_boxes(sizes, spec.scale, spec.ratio, _Draws(generator, len(sizes)))
    return _center_boxes(sizes, spec.center_ratio, spec.size)


def flips(view: ViewSpec, n: int, generator: torch.Generator) -> torch.Tensor:
    """Per image: mirror it? (bool, on the generator's device; all False for a view without flip)."""
    return torch.rand(n, generator=generator, device=generator.device) < (0.5 if view.flip else 0.0)


class _Draws:
    """Random parameters for one batch, drawn on the generator's device (no copy, no sync)."""

    def __init__(self, generator: torch.Generator, n: int):
        self.gen, self.n, self.device = generator, n, generator.device

    def uniform(self, low: float, high: float, shape=(), dtype=torch.float32) -> torch.Tensor:
        u = torch.rand((self.n, *shape), generator=self.gen, dtype=torch.float64, device=self.device)
        return (u * (high - low) + low).to(dtype)

    def coin(self, p: float) -> torch.Tensor:
        return torch.rand(self.n, generator=self.gen, device=self.device) < p

    def integers(self, high: int, shape=()) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.gen, device=self.device)


def _pad_crop(x: torch.Tensor, pad: int, draw: _Draws, flip: torch.Tensor | None) -> torch.Tensor:
    """Zero-pad by `pad`, take a random H x W window per image (one gather from a strided view of all
    windows), mirror it where `flip`."""
    n, h, w, c = x.shape
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))
    dy, dx = draw.integers(2 * pad + 1, (2, n)).to(x.device)
    sn, sh, sw, sc = padded.stride()
    windows = padded.as_strided((n, 2 * pad + 1, 2 * pad + 1, h, w, c), (sn, sh, sw, sh, sw, sc))
    out = windows[torch.arange(n, device=x.device), dy, dx]
    return out if flip is None else torch.where(flip.view(-1, 1, 1, 1), out.flip(2), out)


def _rrc_boxes(sizes: torch.Tensor, scale, ratio, draw: _Draws, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (N x 4: top, left, height, width), torchvision's rule, vectorized: the
    first of `attempts` candidates that fits, else the whole image clamped to the ratio range."""
    height, width = sizes[:, :1].double(), sizes[:, 1:].double()
    f64 = torch.float64
    area = height * width * draw.uniform(*scale, (attempts,), f64)
    log_ratio = draw.uniform(math.log(ratio[0]), math.log(ratio[1]), (attempts,), f64)
    w = torch.round(torch.sqrt(area * torch.exp(log_ratio)))
    h = torch.round(torch.sqrt(area / torch.exp(log_ratio)))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.double().argmax(1, keepdim=True)
    w, h = w.gather(1, first), h.gather(1, first)
    fallback_w = torch.where(width / height < ratio[0], width,
                             torch.where(width / height > ratio[1], torch.round(height * ratio[1]), width))
    fallback_h = torch.where(width / height < ratio[0], torch.round(width / ratio[0]), height)
    found = fits.any(1, keepdim=True)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    top = torch.where(found, torch.floor(draw.uniform(0, 1, (1,), f64) * (height - h + 1)),
                      torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(draw.uniform(0, 1, (1,), f64) * (width - w + 1)),
                       torch.floor((width - w) / 2))
    return torch.cat([top, left, h, w], 1)


def _center_boxes(sizes: torch.Tensor, ratio: float, size: int) -> torch.Tensor:
    """torchvision's Resize(S) + CenterCrop(size), S = round(size / ratio), as a box of the image: the shorter
    side scaled to S and the longer to int(S * longer / shorter), the centre window's corner at
    round((side - size) / 2) (half to even, as Python's round), mapped back to the image's pixels."""
    h, w = sizes[:, 0].double(), sizes[:, 1].double()
    short = float(round(size / ratio))
    new_h = torch.where(h <= w, torch.full_like(h, short), torch.floor(short * h / w))
    new_w = torch.where(h <= w, torch.floor(short * w / h), torch.full_like(w, short))
    top, left = torch.round((new_h - size) / 2) * h / new_h, torch.round((new_w - size) / 2) * w / new_w
    return torch.stack([top, left, size * h / new_h, size * w / new_w], 1)


def _resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int,
                  flip: torch.Tensor | None) -> torch.Tensor:
    """Crop each box out of uint8 NHWC images and resize it to size x size (bilinear), flipping where
    `flip`: one affine grid_sample. Returns float NCHW, 0-255."""
    n, h, w, _ = x.shape
    top, left, bh, bw = boxes.T
    zero = torch.zeros_like(bw)
    scale_x = bw / w if flip is None else torch.where(flip, -bw / w, bw / w)
    theta = torch.stack([torch.stack([scale_x, zero, (2 * left + bw) / w - 1], 1),
                         torch.stack([zero, bh / h, (2 * top + bh) / h - 1], 1)], 1).float()
    grid = F.affine_grid(theta, [n, x.shape[3], size, size], align_corners=False)
    return F.grid_sample(x.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 255)


def _color_jitter(x: torch.Tensor, strength, apply_to: torch.Tensor, draw: _Draws) -> torch.Tensor:
    """torchvision's ColorJitter semantics on 0-255 floats, in the fixed order brightness, contrast,
    saturation, hue; images outside `apply_to` are left untouched. Single-channel images: brightness and
    contrast only."""
    brightness, contrast, saturation, hue = strength
    factors = [draw.uniform(max(0.0, 1 - s), 1 + s) for s in (brightness, contrast, saturation)]
    shift = draw.uniform(-hue, hue)
    out = (x * factors[0].view(-1, 1, 1, 1)).clamp_(0, 255)
    gray = _gray(out) if x.shape[1] == 3 else out
    out = _blend(out, gray.mean((1, 2, 3), keepdim=True), factors[1])
    if x.shape[1] == 3:
        out = _blend(out, _gray(out), factors[2])
        out = _shift_hue(out, shift)
    return torch.where(apply_to.view(-1, 1, 1, 1), out, x)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB 0-255 images by `shift` (fraction of a turn) through HSV."""
    x = x / 255
    value, argmax = x.max(1)
    chroma = value - x.min(1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(1)
    hue = torch.stack([(g - b) / safe, 2 + (b - r) / safe, 4 + (r - g) / safe], 1)
    hue = hue.gather(1, argmax.unsqueeze(1)).squeeze(1)
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    k = torch.remainder(torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)   # 5, 3, 1
                        + hue.unsqueeze(1) * 6, 6)
    rgb = value.unsqueeze(1) - chroma.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return rgb * 255


def _gaussian_blur(x: torch.Tensor, apply_to: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable gaussian blur, one sigma per image, reflect padding; kernel side ~10% of the image
    (torchvision/MoCo convention: 23 for 224 px), odd, at least 3."""
    n, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
    t = torch.arange(k, device=x.device, dtype=torch.float32) - k // 2
    kernel = torch.exp(-t ** 2 / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, k, 1), groups=n * c)
    return torch.where(apply_to.view(-1, 1, 1, 1), y.view(n, c, h, w), x)
