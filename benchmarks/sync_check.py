"""Host synchronisations inside training steps, caught by PyTorch's own detector on a GPU.

For every method (CE, LDAM-DRW, CB-focal, class-balanced sampling, logit adjustment in bf16, CE in fp16 with
Accelerate's GradScaler, gradient accumulation, rotation, MoCo v2, self-training's joint stage, cRT) with the
device loader, and for CE with every available loader on a raw 32 px set and on a JPEG set: one warm-up epoch,
then an epoch whose steady-state steps run under `torch.cuda.set_sync_debug_mode("error")`, where any call
that synchronises the host with the device raises. The guarded window is every step but the first (warm-up
of the epoch) and the last (it holds the epoch's one intended read-back); `--log-every` is longer than the
epoch, so no log read falls inside. The CPU counterpart, which counts the same operations without a GPU, is
tests/test_sync_budget.py.

    python benchmarks/sync_check.py --out benchmarks/results/gpu/sync_check.json     # on a GPU machine

Writes, per case, "ok" with the number of guarded steps, "sync" with the error and where it was raised, or
"failed" (any other error); without CUDA: status "skipped" and the reason.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = {   # name: config overrides ({joint} / {backbone}: files made by make_files)
    "ce": {},
    "ldam_drw": dict(loss="ldam", head="cosine", reweight="drw", drw_epoch=1),
    "cb_focal": dict(loss="focal", reweight="cb"),
    "balanced_sampler": dict(sampler="balanced"),
    "logit_adjust_bf16": dict(loss="logit_adjust", precision="bf16"),
    "ce_fp16_gradscaler": dict(precision="fp16"),
    "ce_grad_accum": dict(grad_accum=2),
    "rotation": dict(method="rotation"),
    "moco_v2": dict(method="moco", moco_queue=256, moco_shuffle_groups=2),
    "self_training_joint": dict(data="{joint}"),
    "crt": dict(method="crt", pretrained="{backbone}", sampler="class_aware"),
}
RUN = dict(arch="resnet32", width=0.5, epochs=2, batch_size=32, lr=0.05, schedule="constant", workers=2,
           log_every=10 ** 6, image_size=64, eval_size=64)
IMAGES, CLASSES = 256, 4


def cuda_guard(on: bool) -> None:
    """PyTorch's detector: every synchronising CUDA call raises while on."""
    import torch
    torch.cuda.set_sync_debug_mode("error" if on else "default")


def guarded_epoch(engine, epoch: int, guard: Callable[[bool], None]) -> int:
    """The engine's own `train_epoch` with `guard(True)` from the stage 2 of its second step to the stage 2 of
    its last (which holds the epoch's read-back); returns the number of guarded steps."""
    loader, original = engine.train_loader, engine.train_loader._batch
    last, step = len(loader) - 1, [-1]

    def batch(*args, **kwargs):
        step[0] += 1
        if step[0] in (1, last):
            guard(step[0] == 1)
        return original(*args, **kwargs)

    loader._batch = batch
    try:
        engine.train_epoch(epoch)
    finally:
        guard(False)
        del loader._batch
    return max(0, last - 1)


def run_case(data: Path, out: Path, overrides: dict, guard: Callable[[bool], None]) -> dict:
    """One warm-up epoch, then one guarded epoch."""
    from accelerate.state import AcceleratorState, GradientState
    from fasttrain.config import Config
    from fasttrain.engine import Engine
    engine = None
    try:
        engine = Engine(Config(data=str(data), out=str(out)).update(RUN | overrides))
        engine.train_epoch(0)
        steps = guarded_epoch(engine, 1, guard)
        return {"status": "ok", "guarded_steps": steps}
    except Exception as e:
        synced = "synchroniz" in str(e).lower()
        return {"status": "sync" if synced else "failed", "error": f"{type(e).__name__}: {e}"[:500],
                "where": traceback.format_exc()[-2500:]}
    finally:
        if engine is not None:
            engine.close()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def smooth_jpeg(rng: np.random.Generator, label: int) -> bytes:
    from PIL import Image
    h, w = rng.integers(60, 120, size=2)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([40 + 50 * label + 40 * yy, 128 + 60 * np.sin(3 * xx + rng.uniform(0, 3)), 90 + 80 * xx * yy], -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_files(root: Path, formats: tuple[str, ...]) -> dict:
    """A raw 32 px set with a pool, a JPEG set, a labeled + pseudo-labeled set and a backbone file."""
    from data_prep.convert import write_dataset
    from fasttrain.dataset import DatasetDir
    from fasttrain.models import build_model
    from fasttrain.models.checkpoint import save_backbone
    from fasttrain.pseudo_label import write_pseudo_dataset
    rng = np.random.default_rng(0)

    def raw_split(offset):
        labels = rng.permutation(np.arange(IMAGES) % CLASSES)
        return {"images": rng.integers(0, 256, (IMAGES, 32, 32, 3), dtype=np.uint8), "labels": labels,
                "source_index": offset + np.arange(IMAGES)}

    raw = write_dataset(root / "raw", {"train": raw_split(0), "unlabeled": raw_split(IMAGES),
                                       "test": raw_split(2 * IMAGES)},
                        num_classes=CLASSES, encoding="raw", formats=formats, shard_size=128, workers=1)
    labels = np.arange(IMAGES // 2) % CLASSES
    jpegs = {"images": [smooth_jpeg(rng, y) for y in labels], "labels": labels, "source_index": np.arange(len(labels))}
    jpeg = write_dataset(root / "jpeg", {"train": jpegs, "test": jpegs}, num_classes=CLASSES, encoding="jpeg",
                         max_side=96, formats=formats, shard_size=64, workers=1)
    pool = DatasetDir(raw).split("unlabeled")
    np.savez(root / "pseudo.npz", position=np.arange(pool.num_samples), source_index=pool.source_index,
             label=rng.integers(0, CLASSES, pool.num_samples), confidence=np.ones(pool.num_samples, np.float32),
             threshold=np.float32(0))
    joint = write_pseudo_dataset(raw, root / "pseudo.npz", root / "joint", workers=1)
    save_backbone(build_model(RUN["arch"], CLASSES, width=RUN["width"]), root / "backbone.pt")
    return {"raw": raw, "jpeg": jpeg, "joint": str(joint), "backbone": str(root / "backbone.pt")}


def available_loaders() -> list[str]:
    import importlib
    kinds = ["device", "torch"]
    for kind, module in (("ffcv", "fasttrain.data.ffcv_loader"), ("dali", "fasttrain.data.dali_loader")):
        try:
            importlib.import_module(module)
            kinds.append(kind)
        except Exception:
            pass
    return kinds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        report = {"status": "skipped", "reason": "no CUDA device: torch.cuda.set_sync_debug_mode needs one "
                                                 "(the CPU counterpart is tests/test_sync_budget.py)"}
    else:
        loaders = available_loaders()
        formats = ("ffcv", "dali") if "ffcv" in loaders else ("dali",)
        cases = {}
        with tempfile.TemporaryDirectory() as tmp:
            files = make_files(Path(tmp), formats)
            for name, overrides in METHODS.items():
                overrides = {k: v.format(**files) if isinstance(v, str) else v for k, v in overrides.items()}
                cases[f"{name}/device/raw"] = run_case(files["raw"], Path(tmp) / name,
                                                       dict(loader="device") | overrides, cuda_guard)
                print(f"[sync_check] {name}/device/raw: {cases[f'{name}/device/raw']['status']}", flush=True)
            for kind in loaders:
                for encoding in ("raw", "jpeg"):
                    key = f"ce/{kind}/{encoding}"
                    if key not in cases:
                        cases[key] = run_case(files[encoding], Path(tmp) / key.replace("/", "_"),
                                              dict(loader=kind), cuda_guard)
                        print(f"[sync_check] {key}: {cases[key]['status']}", flush=True)
        report = {"status": "ok" if all(c["status"] == "ok" for c in cases.values()) else "syncs_found",
                  "device": torch.cuda.get_device_name(0), "loaders": loaders, "settings": RUN, "cases": cases,
                  "steps_without_sync": all(c["status"] == "ok" for c in cases.values())}
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
