"""benchmarks/gpu_check.py: the verdicts against the targets, and its CPU mode end to end on a subset of steps
(the whole CPU mode, `GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh`, takes about 3 minutes)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cpu_mode_runs_its_steps_and_writes_the_report(tmp_path):
    # generous limits: the step processes share two cores with everything else on this machine
    gpu_check.main(["--cpu", "--steps", "environment,cifar", "--out-dir", str(tmp_path), "--budget", "600",
                    "--step-limit", "240"])
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["mode"] == "cpu" and out["steps"]["environment"]["imports"]["torch"] == "ok"
    assert out["steps"]["environment"]["dali"]["available"] in (True, False)
    cifar = out["steps"]["cifar"]["variants"]
    for variant in ("fp32", "bf16_channels_last"):
        assert cifar[variant]["status"] == "ok", cifar[variant]
        assert cifar[variant]["projected_200_epochs_s"] > 0 and cifar[variant]["results"]["device"]["eval_images"] == 64
        assert (tmp_path / f"cifar_{variant}.json").is_file()
    assert out["steps"]["moco"] == {"status": "skipped", "reason": "not in --steps"}
    assert out["verdicts"]["cifar_200_epochs_s"]["met"] is None
