"""benchmarks/gpu_check.py: the verdicts against the targets, and its CPU mode end to end on a subset of steps
(the whole CPU mode, `GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh`, takes about 3 minutes); the sync step's
guarded window (benchmarks/sync_check.py), driven on the CPU by the sync counter instead of PyTorch's detector."""
from __future__ import annotations

import importlib
import json
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from conftest import reset_accelerate
from sync_counter import SyncCounter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402
import sync_check  # noqa: E402


def report(mode="gpu", r50=6000.0, ratio=0.97, epoch=0.1, evaluation=0.04):
    return {"mode": mode, "steps": {
        "resnet50": {"results": {"device": {"images_per_s": r50, "preloaded_images_per_s": r50 / ratio,
                                            "ratio": ratio},
                                 "torch": {"images_per_s": 900.0, "preloaded_images_per_s": 6100.0, "ratio": 0.15}}},
        "cifar": {"variants": {"fp32": {"projected_200_epochs_s": 200 * (epoch + evaluation)},
                               "bf16": {"status": "timeout"}}}}}


def test_verdicts_against_the_targets():
    good = gpu_check.verdicts(report())
    assert good["resnet50_images_per_s"] == {"loader": "device", "value": 6000.0, "target": 5000, "met": True}
    assert good["resnet50_loader_over_preloaded"]["device"]["met"] is True
    assert good["resnet50_loader_over_preloaded"]["torch"]["met"] is False
    assert good["cifar_200_epochs_s"]["met"] is True and good["cifar_200_epochs_s"]["value"] == 28.0
    bad = gpu_check.verdicts(report(r50=4000.0, ratio=0.9, epoch=0.2))
    assert not bad["resnet50_images_per_s"]["met"] and not bad["resnet50_loader_over_preloaded"]["device"]["met"]
    assert not bad["cifar_200_epochs_s"]["met"]
    cpu = gpu_check.verdicts(report(mode="cpu"))
    assert cpu["resnet50_images_per_s"]["met"] is None and "CPU mode" in cpu["cifar_200_epochs_s"]["note"]
    assert cpu["resnet50_loader_over_preloaded"]["device"]["met"] is None
    assert gpu_check.verdicts({"mode": "gpu", "steps": {}}) == {}
    synced = {"steps_without_sync": False, "cases": {"ce/device/raw": {"status": "ok"}, "moco_v2/device/raw":
                                                     {"status": "sync"}}}
    verdict = gpu_check.verdicts({"mode": "gpu", "steps": {"sync": synced}})["steps_without_host_sync"]
    assert verdict["met"] is False and verdict["cases_with_syncs"] == ["moco_v2/device/raw"]


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:
        return False


def test_cpu_mode_runs_its_steps_and_writes_the_report(tmp_path):
    # generous limits: the step processes share two cores with everything else on this machine
    gpu_check.main(["--cpu", "--steps", "environment,cifar,sync", "--out-dir", str(tmp_path), "--budget", "600",
                    "--step-limit", "240"])
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["mode"] == "cpu" and out["steps"]["environment"]["imports"]["torch"] == "ok"
    environment = out["steps"]["environment"]             # what imports in a fresh process, as here
    assert environment["dali"]["available"] is importable("fasttrain.data.dali_loader")
    assert environment["ffcv"]["available"] is importable("fasttrain.data.ffcv_loader")
    assert sorted(out["loaders_skipped"]) == sorted(k for k in ("ffcv", "dali") if not environment[k]["available"])
    assert out["steps"]["sync"]["status"] == "skipped" and "set_sync_debug_mode" in out["steps"]["sync"]["reason"]
    cifar = out["steps"]["cifar"]["variants"]
    for variant in ("fp32", "bf16_channels_last"):
        assert cifar[variant]["status"] == "ok", cifar[variant]
        assert cifar[variant]["projected_200_epochs_s"] > 0 and cifar[variant]["results"]["device"]["eval_images"] == 64
        assert (tmp_path / f"cifar_{variant}.json").is_file()
    assert out["steps"]["moco"] == {"status": "skipped", "reason": "not in --steps"}
    assert out["verdicts"]["cifar_200_epochs_s"]["met"] is None


class RaisingCounter(SyncCounter):
    """Stands in for torch.cuda.set_sync_debug_mode("error") on the CPU: any counted sync raises."""

    def record(self, op: str) -> None:
        if self.active and not self._paused():
            raise RuntimeError(f"called a synchronizing operation: {op}")


def counter_guard():
    counter, stack = RaisingCounter(), ExitStack()

    def guard(on: bool) -> None:
        stack.close()
        if on:
            stack.enter_context(counter.watch_loaders())
            stack.enter_context(counter.counting())
    return guard


@pytest.mark.parametrize("leak", [False, True])
def test_sync_step_guards_the_steady_state_steps(tiny_raw, tmp_path, monkeypatch, leak):
    """Steps 1 .. n-2 of an epoch of the engine's own loop run under the guard, the last step's read-back
    does not; a `.item()` in the loss is reported as a sync, with where it happened."""
    if leak:
        from fasttrain.methods.supervised import Supervised
        real = Supervised.loss

        def leaky(self, model, batch, epoch):
            loss, logs = real(self, model, batch, epoch)
            loss.detach().item()
            return loss, logs
        monkeypatch.setattr(Supervised, "loss", leaky)
    try:
        result = sync_check.run_case(tiny_raw, tmp_path / "run", dict(loader="device", batch_size=16, arch="resnet20",
                                                                      workers=1), counter_guard())
    finally:
        reset_accelerate()
    if leak:
        assert result["status"] == "sync" and "_local_scalar_dense" in result["error"], result
        assert "leaky" in result["where"]
    else:
        assert result == {"status": "ok", "guarded_steps": 3}            # 5 steps: 1, 2 and 3 guarded
