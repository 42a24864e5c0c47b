"""Shared by the benchmark scripts: machine description, ImageNet-like test images, bar plots."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine_info() -> dict:
    import torch
    info = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
            "cpu_cores": os.cpu_count(), "cpu_model": _cpu_model(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "load_average_at_start": os.getloadavg()[0]}
    for name, module in (("ffcv", "ffcv"), ("nvidia-dali", "nvidia.dali"), ("accelerate", "accelerate")):
        try:
            info[name] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            info[name] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()


def natural_images(n: int, rng: np.random.Generator, lo: int = 300, hi: int = 500) -> list[np.ndarray]:
    """ImageNet-like RGB images, 300-500 px a side, about 90 KB as JPEG q90: smooth shapes + texture."""
    import cv2
    images = []
    for _ in range(n):
        h, w = rng.integers(lo, hi + 1, 2)
        small = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img += rng.normal(0, 18, (h, w, 3)).astype(np.int16)  # sensor-like texture sets the JPEG size
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


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
