"""The first GPU run, prepared: everything a GPU machine should measure, in at most 10 minutes on one H100/H200.

    bash benchmarks/gpu_check.sh                    # on the GPU machine
    GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh    # every step at tiny sizes on the CPU (<= 3 minutes)

Steps, each in its own process with its own time limit (a step that fails or runs out of time is recorded as
such and the next one runs; a step whose prerequisite is missing is skipped, saying why):
  environment  versions, device, GPU memory, nvidia-smi, which of ffcv / nvidia.dali (and the other imports
               fasttrain needs) are importable
  loaders      loader throughput with `--device cuda` (benchmarks/loader_throughput.py): JPEG RandomResizedCrop
               160 and 32 px raw, every available loader
  resnet50     ResNet-50 @160 bf16 channels-last training with each available loader against the same batches
               pre-loaded (benchmarks/train_throughput.py); targets >= 5,000 img/s and a ratio >= 0.95
  cifar        a CIFAR-10-LT-sized epoch (12,406 images, batch 128) of ResNet-32 with the device loader, fp32 and
               bf16 channels-last, plus one evaluation of 10,000 test images; the projected 200-epoch time
               (200 x (epoch + evaluation)); target < 30 s
  moco         MoCo v2 steps, ResNet-50, two views at 160 px (benchmarks/ssl_throughput.py)
  sync         steady-state steps of every method and loader under torch.cuda.set_sync_debug_mode("error")
               (benchmarks/sync_check.py): target no host synchronisation in a step; skipped in CPU mode
Writes benchmarks/results/gpu/gpu_check.json (every step's settings and results, the verdicts against the
targets), each step's own JSON next to it, and gpu_check.png (where matplotlib is installed).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = {"resnet50_images_per_s": 5000, "resnet50_loader_over_preloaded": 0.95, "cifar_200_epochs_s": 30}
NEEDED = ("torch", "numpy", "PIL", "yaml", "tqdm", "psutil", "safetensors", "accelerate")

# (step, per-step limit in s) on the GPU; sizes per mode below
GPU_LIMITS = {"environment": 30, "loaders": 100, "resnet50": 160, "cifar": 55, "moco": 60, "sync": 90}  # cifar: x2
CPU_LIMITS = {"environment": 20, "loaders": 30, "resnet50": 60, "cifar": 35, "moco": 30, "sync": 0}


def sizes(cpu: bool) -> dict:
    """Command-line arguments of each step: the real ones on a GPU, tiny ones in CPU mode."""
    if cpu:
        return {
            "loaders": ["--num-jpeg", "32", "--num-raw", "256", "--epochs", "1", "--rounds", "1",
                        "--batch-size", "16", "--size", "64", "--sets", "jpeg,raw"],
            # fp32: bf16 autocast on a CPU without bf16 units is several times slower
            "resnet50": ["--arch", "resnet50", "--image-size", "66", "--images", "10", "--batch-size", "5",
                         "--rounds", "1", "--precision", "no", "--channels-last"],
            "cifar": ["--arch", "resnet32", "--image-size", "32", "--images", "128", "--test-images", "64",
                      "--batch-size", "32", "--rounds", "1"],
            "moco": ["--arch", "resnet50", "--width", "1", "--image-size", "64", "--images", "16", "--batch-size",
                     "16", "--epochs", "1", "--precision", "bf16", "--channels-last"],
        }
    return {
        "loaders": ["--num-jpeg", "2048", "--num-raw", "50000", "--epochs", "2", "--rounds", "2",
                    "--batch-size", "256", "--size", "160", "--sets", "jpeg,raw"],
        "resnet50": ["--arch", "resnet50", "--image-size", "160", "--images", "3072", "--batch-size", "256",
                     "--rounds", "2", "--precision", "bf16", "--channels-last"],
        "cifar": ["--arch", "resnet32", "--image-size", "32", "--images", "12406", "--test-images", "10000",
                  "--batch-size", "128", "--rounds", "2"],
        "moco": ["--arch", "resnet50", "--width", "1", "--image-size", "160", "--images", "2048", "--batch-size",
                 "256", "--epochs", "1", "--precision", "bf16", "--channels-last"],
    }


IMPORT_CHECK = """
import importlib, json, sys
out = {}
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
        out[m] = "ok"
    except Exception as e:  # ffcv / DALI can fail at import (missing shared library), not only be absent
        out[m] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(out))
"""


def importable(modules: list[str]) -> dict[str, str]:
    """For each module: "ok" if it imports in a fresh interpreter, else why not (one process for all)."""
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK, *modules], capture_output=True, text=True,
                          timeout=120, env=step_env())
    if done.returncode != 0:
        return {m: f"import check failed: {done.stderr.strip()[-300:]}" for m in modules}
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def environment(cpu: bool) -> dict:
    import torch
    sys.path.insert(0, str(HERE))
    from common import machine_info
    info = {"machine": machine_info(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "mode": "cpu" if cpu else "gpu"}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    cudnn=torch.backends.cudnn.version(), gpu_memory_gib=round(total / 2**30, 1),
                    gpu_free_gib=round(free / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    loaders = {"ffcv": "fasttrain.data.ffcv_loader", "dali": "fasttrain.data.dali_loader"}
    found = importable([*NEEDED, "matplotlib", "numba", "cv2", *loaders.values()])
    info["imports"] = {m: found[m] for m in (*NEEDED, "matplotlib", "numba", "cv2")}
    for kind, module in loaders.items():
        info[kind] = {"available": found[module] == "ok", "detail": found[module]}
    return info


def run_step(name: str, script: str, args: list[str], out: Path, limit: float) -> dict:
    """benchmarks/<script> with `args --out out` in its own process; its JSON, or why there is none."""
    cmd = [sys.executable, str(HERE / script), *args, "--out", str(out)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=step_env(), cwd=REPO)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-1500:]
        return {"status": "timeout", "limit_s": limit, "command": " ".join(cmd),
                "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0 or not out.is_file():
        return {"status": "failed", "seconds": seconds, "command": " ".join(cmd),
                "output_tail": (done.stdout + done.stderr)[-3000:]}
    return {"status": "ok", "seconds": seconds, "command": " ".join(cmd), **json.loads(out.read_text())}


def verdicts(report: dict) -> dict:
    """The targets, met or not, from what was measured (None: not measured)."""
    out = {}
    r50 = report["steps"].get("resnet50", {}).get("results", {})
    if r50:
        best = max(r50, key=lambda k: r50[k]["images_per_s"])
        out["resnet50_images_per_s"] = {"loader": best, "value": round(r50[best]["images_per_s"], 1),
                                        "target": TARGETS["resnet50_images_per_s"],
                                        "met": r50[best]["images_per_s"] >= TARGETS["resnet50_images_per_s"]}
        out["resnet50_loader_over_preloaded"] = {
            k: {"value": round(v["ratio"], 3), "met": v["ratio"] >= TARGETS["resnet50_loader_over_preloaded"]}
            for k, v in r50.items()}
    cifar = report["steps"].get("cifar", {}).get("variants", {})
    projections = {k: v["projected_200_epochs_s"] for k, v in cifar.items() if "projected_200_epochs_s" in v}
    if projections:
        best = min(projections, key=projections.get)
        out["cifar_200_epochs_s"] = {"variant": best, "value": round(projections[best], 1),
                                     "target": TARGETS["cifar_200_epochs_s"],
                                     "met": projections[best] < TARGETS["cifar_200_epochs_s"]}
    sync = report["steps"].get("sync", {})
    if "steps_without_sync" in sync:
        out["steps_without_host_sync"] = {"value": sync["steps_without_sync"], "met": sync["steps_without_sync"],
                                          "cases_with_syncs": sorted(k for k, v in sync["cases"].items()
                                                                     if v["status"] != "ok")}
    if report["mode"] == "cpu":
        note = "CPU mode: tiny sizes, not comparable with the targets"
        out = {k: {**v, "met": None, "note": note} if "met" in v else
               {loader: {**r, "met": None, "note": note} for loader, r in v.items()} for k, v in out.items()}
    return out


def plot(report: dict, path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        return
    sys.path.insert(0, str(HERE))
    from common import save_bar_plot
    bars = {}
    for loader, r in report["steps"].get("resnet50", {}).get("results", {}).items():
        bars[f"R50 {loader}"] = r["images_per_s"]
        bars[f"R50 {loader}\npre-loaded"] = r["preloaded_images_per_s"]
    for variant, r in report["steps"].get("cifar", {}).get("variants", {}).items():
        if "results" in r:
            bars[f"R32 {variant}"] = r["results"]["device"]["images_per_s"]
    for loader, r in report["steps"].get("moco", {}).get("results", {}).get("moco", {}).items():
        bars[f"MoCo {loader}"] = r["images_per_s_per_view"]
    if bars:
        save_bar_plot(bars, path, f"gpu_check ({report['mode']} mode, {report['steps']['environment'].get('device', 'cpu')}): "
                                  f"training images/s")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results" / "gpu"))
    p.add_argument("--cpu", action="store_true", default=os.environ.get("GPU_CHECK_CPU") == "1",
                   help="tiny sizes on the CPU (also: GPU_CHECK_CPU=1)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 560 GPU, 175 CPU)")
    p.add_argument("--steps", default="environment,loaders,resnet50,cifar,moco,sync")
    p.add_argument("--step-limit", type=float, default=None,
                   help="seconds per step instead of the defaults (e.g. on a busy shared machine)")
    args = p.parse_args(argv)
    cpu, started = args.cpu, time.perf_counter()
    budget = args.budget or (175 if cpu else 560)
    limits, size = (CPU_LIMITS if cpu else GPU_LIMITS), sizes(cpu)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    env = environment(cpu)
    if not cpu and not env["cuda_available"]:
        raise SystemExit("gpu_check: no CUDA device; run GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh on a CPU machine")
    device = "cpu" if cpu else "cuda"
    report = {"benchmark": "gpu_check", "mode": env["mode"], "targets": TARGETS, "steps": {"environment": env}}
    kinds = ["device", "torch"] + [k for k in ("ffcv", "dali") if env[k]["available"]]
    skipped_kinds = {k: env[k]["detail"] for k in ("ffcv", "dali") if not env[k]["available"]}
    missing = [m for m in NEEDED if env["imports"][m] != "ok"]

    def left() -> float:
        return budget - (time.perf_counter() - started)

    def step(name: str, script: str, extra: list[str], out_name: str | None = None) -> dict:
        if name not in args.steps.split(","):
            return {"status": "skipped", "reason": "not in --steps"}
        if missing:
            return {"status": "skipped", "reason": f"fasttrain's imports missing: {missing}"}
        limit = min(args.step_limit or limits[name], left())
        if limit < 10:
            return {"status": "skipped", "reason": f"time budget of {budget:.0f} s used up"}
        print(f"[gpu_check] {name} (limit {limit:.0f} s)", flush=True)
        return run_step(name, script, extra, out_dir / (out_name or f"{name}.json"), limit)

    # the baselines (PyTorch + PIL, FFCV's own Loader) only on the GPU: on the CPU their worker start-up and
    # JIT compilation alone would take the CPU mode's time
    baselines = [] if cpu else ["torch_pil"] + (["ffcv_raw"] if env["ffcv"]["available"] else [])
    loader_names = baselines + [f"fasttrain_{k}" for k in kinds]
    report["steps"]["loaders"] = step("loaders", "loader_throughput.py",
                                      size["loaders"] + ["--loaders", ",".join(loader_names), "--device", device,
                                                         "--workers", str(len(os.sched_getaffinity(0)))])
    # CPU mode: ResNet-50 with two loaders only (bf16 on a CPU is slow); every available loader on the GPU
    r50_kinds = ["device", "torch"] if cpu else kinds
    report["steps"]["resnet50"] = step("resnet50", "train_throughput.py", size["resnet50"] + ["--loaders", ",".join(r50_kinds)])
    cifar = {}
    for variant, extra in (("fp32", []), ("bf16_channels_last", ["--precision", "bf16", "--channels-last"])):
        r = step("cifar", "train_throughput.py", size["cifar"] + ["--loaders", "device", "--time-eval"] + extra,
                 f"cifar_{variant}.json")
        if r["status"] == "ok":
            d = r["results"]["device"]
            epoch_s = d["train_images"] / d["images_per_s"]
            r.update(epoch_seconds=epoch_s, eval_seconds=d["eval_seconds"],
                     projected_200_epochs_s=200 * (epoch_s + d["eval_seconds"]))
        cifar[variant] = r
    report["steps"]["cifar"] = {"status": "ok" if all(v["status"] == "ok" for v in cifar.values()) else "partial",
                                "variants": cifar}
    report["steps"]["moco"] = step("moco", "ssl_throughput.py",
                                   size["moco"] + ["--methods", "moco", "--loaders", "device"])
    if cpu and "sync" in args.steps.split(","):
        report["steps"]["sync"] = {"status": "skipped", "reason": "CPU mode: torch.cuda.set_sync_debug_mode needs a "
                                   "CUDA device; tests/test_sync_budget.py counts the same operations on the CPU"}
    else:
        report["steps"]["sync"] = step("sync", "sync_check.py", [])
    report["loaders_skipped"] = {k: f"not importable here ({v}); see README, 'GPU'" for k, v in skipped_kinds.items()}
    report["verdicts"] = verdicts(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, path.with_suffix(".png"))
    print(json.dumps({"mode": report["mode"], "seconds": report["seconds"], "loaders_skipped": report["loaders_skipped"],
                      "steps": {k: v.get("status", "ok") for k, v in report["steps"].items()},
                      "verdicts": report["verdicts"]}, indent=1))
    print(f"[gpu_check] wrote {path}")
    return report


if __name__ == "__main__":
    main()
