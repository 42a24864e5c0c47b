"""Shared by the benchmark scripts: machine description, ImageNet-like test images, bar plots."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine_info() -> dict:
    """Where a number was measured: CPU, cores, GPU, load at the start, package versions."""
    import torch
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    packages = ("torch", "ffcv", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "accelerate", "numpy", "numba",
                "pillow", "opencv-python", "opencv-python-headless")
    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_model": _cpu_model(),
            "cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "load_average_at_start": os.getloadavg()[0], "versions": {p: version(p) for p in packages}}


def labels(rng: np.random.Generator, n: int, num_classes: int = 10) -> np.ndarray:
    """Random labels with every class present (n >= num_classes): the converter refuses empty classes."""
    return rng.permutation(np.arange(n) % num_classes)


def formats() -> tuple[str, ...]:
    """Formats a benchmark dataset is written in: both where FFCV is installed, else the DALI shards (which
    the dali, torch and device loaders read)."""
    import importlib.util
    return ("ffcv", "dali") if importlib.util.find_spec("ffcv") else ("dali",)


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer measures it."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def natural_image(rng: np.random.Generator, lo: int = 300, hi: int = 500) -> np.ndarray:
    """An ImageNet-like RGB image, 300-500 px a side: smooth colour structure plus sensor-like texture,
    which makes it about 90 KB as a quality-90 JPEG (real photos' size)."""
    import cv2
    h, w = rng.integers(lo, hi + 1, 2)
    small = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
    img = cv2.resize(small, (int(w), int(h)), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.normal(0, 18, (h, w, 3)).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def natural_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(natural_image(rng)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def save_bar_plot(values: dict[str, float], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(values)), 3.6))
    bars = ax.bar(list(values), list(values.values()), color="#4477aa")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=10)
    plt.setp(ax.get_xticklabels(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
