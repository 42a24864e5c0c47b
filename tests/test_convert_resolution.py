"""The pixels of ImageNet-LT / iNaturalist sets: what the converter stores, and that every loader's evaluation
view then gives the paper's Resize(256) + CenterCrop(224) of the original image."""
import io

import numpy as np
import pytest
import torch
from data_prep_fixtures import detailed_image, resize_center_crop, write_split
from PIL import Image

from data_prep.convert import convert, write_dataset
from data_prep.writers import stored_size
from fasttrain.data import augment as A
from fasttrain.data import build_loader
from fasttrain.data.device_loader import DeviceLoader
from fasttrain.data.shards import ShardReader
from fasttrain.dataset import DatasetDir, DatasetError

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

KINDS = ["ffcv", "dali", "torch", "device"]
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
SIZES = [(375, 500), (600, 800), (800, 600)]      # (height, width): ImageNet's typical size, iNat's largest
MIN_PSNR = 32.0   # dB. Measured: JPEG originals 38.7 (device) to 90.9 (torch); PNG originals re-encoded at
#                   quality 90: 34.0 to 36.7; the old 256 cap: 25.5 to 29.3


def test_stored_size_keeps_originals_and_a_shorter_side_of_256():
    assert stored_size(500, 375, 800) == (500, 375) and stored_size(800, 600, 800) == (800, 600)
    assert stored_size(1600, 1200, 800) == (800, 600) and stored_size(1200, 1600, 800) == (600, 800)
    assert stored_size(3000, 600, 800) == (1280, 256)      # the cap would leave 160: the shorter side stays 256
    assert stored_size(600, 3000, 800) == (256, 1280)
    assert stored_size(3000, 200, 800) == (800, 53)        # shorter than 256 to begin with: the cap holds
    assert stored_size(500, 375, 256) == (341, 256)        # the speed option: Resize(256)'s size
    assert stored_size(640, 427, 256) == (383, 256)        # torchvision: int(256 * 640 / 427) = 383
    assert stored_size(300, 200, 256) == (256, 171) and stored_size(384, 256, 256) == (384, 256)


def reference(img: np.ndarray) -> np.ndarray:
    """The paper's evaluation transform of the original image: Resize(256) + CenterCrop(224)."""
    return resize_center_crop(Image.fromarray(img), 256, 224)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)))


def eval_pixels(ds: DatasetDir, kind: str) -> np.ndarray:
    """Every train image through `kind`'s evaluation view, un-normalised with the paper's ImageNet constants."""
    with build_loader(ds, "train", kind=kind, batch_size=8, views=[A.large_eval(224)], train=False,
                      workers=2) as loader:
        x = torch.cat([b.images for b in loader]).permute(0, 2, 3, 1).numpy()
    return x * IMAGENET_STD + IMAGENET_MEAN


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """An ImageNet-style tree: each size as a JPEG (kept as it is) and as a PNG (decoded and re-encoded)."""
    root, rng = tmp_path_factory.mktemp("imagenet"), np.random.default_rng(0)
    lines, pixels = [], []
    for label, (h, w) in enumerate(SIZES):
        img = detailed_image(rng, h, w)
        (root / "train" / f"n{label:08d}").mkdir(parents=True)
        for ext in ("JPEG", "png"):
            path = root / "train" / f"n{label:08d}" / f"{ext}.{ext}"
            Image.fromarray(img).save(path, quality=95)
            lines.append(f"{path.relative_to(root)} {label}")
            pixels.append(np.asarray(Image.open(path).convert("RGB")))    # what the paper's loader decodes
    return root, write_split(root / "train.txt", lines), pixels


@pytest.fixture(scope="module")
def default_set(originals, tmp_path_factory):
    root, split, _ = originals
    return DatasetDir(convert(["--source", "imagenet_lt", "--root", str(root), "--num-classes", "3",
                               "--split-file", str(split), "--workers", "2",
                               "--out", str(tmp_path_factory.mktemp("out") / "default")]))


def test_default_conversion_keeps_jpeg_originals_byte_for_byte(originals, default_set):
    root, split, _ = originals
    m = default_set.manifest
    assert m["image"]["max_side"] == 800 and m["image"]["largest_side"] == 800
    assert m["splits"]["train"]["stored"] == {"original": 3, "re-encoded": 3, "resized": 0}
    reader = ShardReader(default_set.require_files("train", "dali"))
    files = [root / line.split()[0] for line in split.read_text().splitlines()]
    for pos, path in enumerate(files):
        stored = reader.image_bytes(pos).tobytes()
        assert (stored == path.read_bytes()) == (path.suffix == ".JPEG")
        assert Image.open(path).size == Image.open(io.BytesIO(stored)).size


@pytest.mark.parametrize("kind", KINDS)
def test_eval_view_of_the_default_set_is_the_papers(originals, default_set, kind):
    """Resize(256) + CenterCrop(224) of the original, normalised with the paper's ImageNet constants: within
    JPEG requantisation (PNG originals) of the reference, for 500 x 375, 800 x 600 and 600 x 800 images."""
    _, _, pixels = originals
    got = eval_pixels(default_set, kind)
    scores = [psnr(x, reference(img)) for x, img in zip(got, pixels)]
    assert min(scores) > MIN_PSNR, scores


def old_cap(img: np.ndarray) -> np.ndarray:
    """How the converter used to store an image: longer side 256, bicubic (then JPEG quality 90)."""
    h, w = img.shape[:2]
    scale = 256 / max(h, w)
    return np.asarray(Image.fromarray(img).resize((round(w * scale), round(h * scale)), Image.BICUBIC))


def test_the_old_256_cap_fails_the_same_bound(originals, tmp_path):
    """The bound tells the two apart: the same images stored as the converter used to store them miss it."""
    _, _, pixels = originals
    ds = DatasetDir(write_dataset(tmp_path / "old", {"train": {"images": [old_cap(img) for img in pixels],
                                                               "labels": [0, 0, 1, 1, 2, 2]}},
                                  num_classes=3, encoding="jpeg", jpeg_quality=90, formats=("dali",), workers=2,
                                  normalization={"name": "paper", "mean": IMAGENET_MEAN / 255,
                                                 "std": IMAGENET_STD / 255}))
    assert ds.largest_side == 256
    scores = [psnr(x, reference(img)) for x, img in zip(eval_pixels(ds, "torch"), pixels)]
    assert max(scores) < MIN_PSNR, scores


def test_speed_option_stores_resize_256s_size(originals, tmp_path):
    root, split, _ = originals
    ds = DatasetDir(convert(["--source", "imagenet_lt", "--root", str(root), "--num-classes", "3", "--split-file",
                             str(split), "--max-side", "256", "--formats", "dali", "--workers", "2",
                             "--out", str(tmp_path / "small")]))
    assert ds.manifest["splits"]["train"]["stored"] == {"original": 0, "re-encoded": 0, "resized": 6}
    reader = ShardReader(ds.require_files("train", "dali"))
    sizes = [Image.open(io.BytesIO(reader.image_bytes(pos).tobytes())).size for pos in range(6)]
    assert sizes == [(341, 256)] * 4 + [(256, 341)] * 2 and ds.largest_side == 341


# ---------------------------------------------------------------- large stored images in the loaders


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    """A panorama whose shorter side the cap would take below 256 (stored 1024 x 256), a tall and a wide
    image, as arrays (re-encoded)."""
    rng = np.random.default_rng(3)
    images = [detailed_image(rng, 300, 1200), detailed_image(rng, 300, 40), detailed_image(rng, 40, 300)]
    return DatasetDir(write_dataset(tmp_path_factory.mktemp("mixed") / "ds",
                                    {"train": {"images": images, "labels": [0, 1, 1]}}, num_classes=2,
                                    encoding="jpeg", workers=2))


def test_largest_side_bounds_every_stored_image_and_sizes_the_device_canvas(mixed_set):
    assert mixed_set.image["max_side"] == 800 and mixed_set.largest_side == 1024
    views = [A.large_eval(224)]
    loader = DeviceLoader(mixed_set, "train", batch_size=3, views=views, train=False, workers=2)
    assert loader.images.shape == (3, 1024, 1024, 3) and loader.bytes_needed() == 3 * (1024 * 1024 * 3 + 16)
    assert loader.sizes.tolist() == [[256, 1024], [300, 40], [40, 300]]
    torch_view = next(iter(build_loader(mixed_set, "train", kind="torch", batch_size=3, views=views, train=False,
                                        workers=1))).images
    assert (next(iter(loader)).images - torch_view).abs().mean() < 0.05   # normalised units; measured 0.005


def test_device_loader_refuses_a_split_larger_than_half_the_free_memory(mixed_set, monkeypatch):
    import fasttrain.data.device_loader as device_loader
    monkeypatch.setattr(device_loader, "free_memory", lambda device: 2 * 3 * (1024 * 1024 * 3 + 16) - 2)
    with pytest.raises(DatasetError, match=r"--loader device: split 'train' of .* needs 0\.01 GiB on cpu .*more "
                                           r"than 50% of the 0\.02 GiB free; use --loader ffcv or --loader dali"):
        DeviceLoader(mixed_set, "train", batch_size=3, views=[A.large_eval(32)], train=False, workers=2)


def test_ffcv_decode_buffers_hold_the_largest_image_not_the_tallest_times_the_widest():
    """(Decoding with them: test_eval_view_of_the_default_set_is_the_papers[ffcv], tall and wide images.)"""
    from ffcv.pipeline.state import State

    from fasttrain.data.ffcv_loader import RandomResizedCropDecoder, ResizeCenterCropDecoder
    metadata = np.array([(300, 40), (40, 300)], dtype=[("height", "<u4"), ("width", "<u4")])
    state = State(jit_mode=True, device=torch.device("cpu"), shape=(), dtype=np.dtype("u1"))
    for decoder in (RandomResizedCropDecoder((32, 32)), ResizeCenterCropDecoder((32, 32), 0.875)):
        decoder.accept_globals(metadata, None)
        _, queries = decoder.declare_state_and_memory(state)
        assert queries[1].shape == (300 * 40 * 3,)                 # FFCV's own decoders: 300 * 300 * 3
    assert queries[2].shape == (37 * int(37 * 300 / 40) * 3,)       # Resize(37): 37 x 277

