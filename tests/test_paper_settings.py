"""The paper's settings: lr schedules as positions in the run (CIFAR rule exact at 200 epochs, the same shape
at 20) and the line that prints them, DRW, the class-aware sampler, the Resample preset, LDAM's cosine head,
cRT's BatchNorm statistics, ImageNet-LT / iNat presets with linear lr scaling, and metrics.json's final and
best blocks (selected on test without val, on val with it)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import yaml

from fasttrain.config import Config
from fasttrain.data.sampling import epoch_order, shard_train
from fasttrain.engine import batch_and_lr, lr_at, schedule_line

from conftest import TINY_RUN, fit, reset_accelerate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from presets import (CIFAR, CRT_IMAGENET_LT, CRT_INAT, IMAGENET_LT, INAT, LDAM_DRW, MOCO,  # noqa: E402
                     RESAMPLE)


def paper_cifar_lr(epoch0: int, epochs: int, lr: float = 0.1) -> float:
    """utils.adjust_learning_rate with its epochs 5 / 160 / 180 taken as positions in a run of `epochs`."""
    e = epoch0 + 1
    if e <= 5 * epochs / 200:
        return lr * e / (5 * epochs / 200)
    if e > 180 * epochs / 200:
        return lr * 0.0001
    if e > 160 * epochs / 200:
        return lr * 0.01
    return lr


def test_cifar_schedule_is_the_papers_rule_exactly_at_200_epochs():
    cfg = Config().update(CIFAR)
    assert [lr_at(cfg, e) for e in range(200)] == [paper_cifar_lr(e, 200) for e in range(200)]
    assert [lr_at(cfg, 0), lr_at(cfg, 4), lr_at(cfg, 159), lr_at(cfg, 160), lr_at(cfg, 180)] == \
        [0.1 / 5, 0.1, 0.1, 0.1 * 0.01, 0.1 * 0.0001]
    for step in range(7):  # one lr for the whole epoch, as the paper's code
        assert lr_at(cfg, 2, step, 7) == lr_at(cfg, 2)


def test_a_shorter_run_keeps_the_papers_shape():
    cfg = Config().update(CIFAR | {"epochs": 20})
    lrs = [lr_at(cfg, e) for e in range(20)]
    assert lrs == [paper_cifar_lr(e, 20) for e in range(20)]
    assert lrs == [0.1] * 16 + [0.001] * 2 + [1e-5] * 2                   # x0.01 from 16, x1e-4 from 18
    assert cfg.schedule_epochs() == {"warmup": 0.5, "milestones": [16.0, 18.0], "drw": 16}
    assert Config().update(CIFAR).schedule_epochs() == {"warmup": 5.0, "milestones": [160.0, 180.0], "drw": 160}


def test_absolute_epochs_override_the_fractions():
    cfg = Config().update(CIFAR | {"epochs": 20, "warmup_epochs": 2, "milestone_epochs": [10, 15],
                                   "drw_epoch": 12})
    assert cfg.schedule_epochs() == {"warmup": 2.0, "milestones": [10.0, 15.0], "drw": 12}
    assert [lr_at(cfg, e) for e in (0, 1, 9, 10, 14, 15)] == [0.05, 0.1, 0.1, 0.001, 0.001, 1e-5]


def test_cosine_schedules_of_the_imagenet_and_moco_code():
    cfg = Config().update(IMAGENET_LT)  # CosineAnnealingLR stepped before each epoch: epoch e at lr(e/90)
    for e in range(90):
        assert lr_at(cfg, e) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * (e + 1) / 90)), abs=1e-12)
    assert lr_at(cfg, 89) == pytest.approx(0.0, abs=1e-12)
    moco = Config().update(MOCO)       # pretrain_moco.adjust_learning_rate: epoch e (0-based) at lr(e/200)
    for e in range(200):
        assert lr_at(moco, e) == pytest.approx(0.015 * 0.5 * (1 + math.cos(math.pi * e / 200)), abs=1e-12)
    step = Config().update(CIFAR | {"lr_update": "step"})  # per-step warm-up, when asked for
    assert lr_at(step, 0, 0, 10) == pytest.approx(0.1 * 0.1 / 5) and lr_at(step, 0, 9, 10) == pytest.approx(0.02)


def test_the_start_of_a_run_says_at_which_epochs_the_lr_changes():
    assert schedule_line(Config().update(CIFAR)) == \
        "lr by epoch (base 0.1): 1-4: 0.02 -> 0.08 (warm-up), 5-160: 0.1, 161-180: 0.001, 181-200: 1e-05"
    assert schedule_line(Config().update(CIFAR | {"epochs": 20, "reweight": "drw"})) == \
        "lr by epoch (base 0.1): 1-16: 0.1, 17-18: 0.001, 19-20: 1e-05; DRW from epoch 17"
    assert schedule_line(Config().update(IMAGENET_LT)) == "lr by epoch (base 0.2): 1-90: 0.1999 -> 0 (cosine)"
    assert schedule_line(Config().update(MOCO)) == "lr by epoch (base 0.015): 1-200: 0.015 -> 9.253e-07 (cosine)"
    # a 1-epoch CIFAR run trains at the base lr (its milestones 0.8 and 0.9 start no epoch), but never re-weights
    assert schedule_line(Config().update(CIFAR | {"epochs": 1, "reweight": "drw"})) == \
        "lr by epoch (base 0.1): 1: 0.1; DRW never (it starts at epoch 2)"


@pytest.mark.parametrize("preset, overrides, highest", [
    (IMAGENET_LT, {"epochs": 1}, "0 in epoch 1"),                         # cosine at e/T: its only epoch at lr 0
    (CIFAR, {"epochs": 3, "warmup_epochs": 5}, "0.06 in epoch 3"),        # the warm-up outlasts the run
    (CIFAR, {"epochs": 10, "milestone_epochs": [0, 5]}, "0.001 in epoch 1"),
])
def test_a_schedule_that_never_reaches_the_base_lr_is_warned_about(preset, overrides, highest):
    line = schedule_line(Config().update(preset | overrides))
    assert "WARNING: no epoch trains within 10% of the base lr" in line and f"(highest: {highest})" in line
    for fine in (CIFAR, IMAGENET_LT | {"epochs": 5}, MOCO | {"epochs": 1}, CIFAR | {"epochs": 1}):
        assert "WARNING" not in schedule_line(Config().update(fine))


def test_schedule_flags_are_checked():
    with pytest.raises(ValueError, match="--milestone-epochs 160,180"):
        Config().update(CIFAR | {"milestones": [160, 180]}).validate()
    with pytest.raises(ValueError, match="--drw-epoch"):
        Config().update({"drw_at": 160}).validate()
    with pytest.raises(ValueError, match="--lr-update"):
        Config().update({"lr_update": "sometimes"}).validate()
    with pytest.raises(ValueError, match="factor for every milestone"):
        Config().update({"milestones": [0.5, 0.8], "milestone_factors": [0.1]}).validate()


@pytest.mark.parametrize("epochs, switch", [(20, 16), (200, 160)])
def test_drw_switches_at_the_papers_position(tiny_raw, epochs, switch):
    from fasttrain.dataset import DatasetDir
    from fasttrain.methods.supervised import Supervised
    cfg = Config().update(CIFAR | {"epochs": epochs, "loss": "ce", "reweight": "drw"})
    loss = Supervised(cfg, DatasetDir(tiny_raw)).build_criterion([48, 24, 12, 6], "cpu")
    logits, targets = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 4
    plain = torch.nn.functional.cross_entropy(logits, targets)
    assert loss(logits, targets, switch - 1) == plain
    assert loss(logits, targets, switch) != plain
    assert loss(logits, targets, switch) == loss(logits, targets, epochs - 1)


# ---------------------------------------------------------------- class-aware sampler
LABELS = np.repeat([0, 1, 2, 3, 4], [300, 60, 17, 5, 2])


def test_class_aware_runs_of_4_cycle_through_shuffled_classes():
    order = epoch_order(LABELS, "class_aware", seed=0, epoch=0)
    assert order.dtype == np.int64 and len(order) == len(LABELS)
    runs = LABELS[order][: len(order) // 4 * 4].reshape(-1, 4)
    assert (runs == runs[:, :1]).all()                                  # 4 images of one class in a row
    classes = runs[:, 0]
    passes = classes[: len(classes) // 5 * 5].reshape(-1, 5)
    assert all(sorted(p) == [0, 1, 2, 3, 4] for p in passes)            # every class once per pass ...
    assert len({tuple(p) for p in passes}) > 1                          # ... in a reshuffled order
    for c, n in zip(range(5), [300, 60, 17, 5, 2]):                     # each class walks its shuffled list
        mine = order[LABELS[order] == c]
        for start in range(0, len(mine) - n + 1, n):
            assert sorted(mine[start:start + n]) == list(np.flatnonzero(LABELS == c))
    assert np.bincount(LABELS[order]).min() >= 4 * (len(runs) // 5)    # balanced over classes


def test_class_aware_is_deterministic_and_honours_samples_per_class():
    a = epoch_order(LABELS, "class_aware", seed=3, epoch=1)
    assert np.array_equal(a, epoch_order(LABELS, "class_aware", seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(LABELS, "class_aware", seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(LABELS, "class_aware", seed=4, epoch=1))
    two = LABELS[epoch_order(LABELS, "class_aware", seed=0, epoch=0, samples_per_class=2)][:380].reshape(-1, 2)
    assert (two == two[:, :1]).all() and not (two.reshape(-1, 4) == two.reshape(-1, 4)[:, :1]).all()


def test_class_aware_shards_lose_nothing_and_keep_the_global_batches():
    order = epoch_order(LABELS, "class_aware", seed=0, epoch=0)
    shards = [shard_train(order, r, 4) for r in range(4)]
    together = np.empty(sum(map(len, shards)), dtype=np.int64)
    for r, s in enumerate(shards):
        together[r::4] = s
    assert np.array_equal(together, order[: len(order) // 4 * 4])      # nothing lost, nothing repeated
    per_rank = 8                                                        # global batch 32 = the same 32 samples
    for k in range(len(shards[0]) // per_rank):
        step = np.concatenate([s[k * per_rank:(k + 1) * per_rank] for s in shards])
        assert sorted(step) == sorted(order[k * 32:(k + 1) * 32])


# ---------------------------------------------------------------- Resample
def test_the_resample_preset_is_the_papers_sampler_through_the_engine(tiny_raw, tmp_path):
    from fasttrain.engine import Engine
    assert (RESAMPLE["sampler"], RESAMPLE["cb_beta"]) == ("resample", 0.9999)
    cfg = Config(data=str(tiny_raw), out=str(tmp_path / "run")).update(TINY_RUN | RESAMPLE | {"cb_beta": 0.9})
    engine = Engine(cfg)                                   # the engine hands --sampler and --cb-beta to its loader
    labels = engine.dataset.split("train").labels
    want = epoch_order(labels, "resample", seed=0, epoch=0, cb_beta=0.9)
    assert np.array_equal(engine.train_loader.epoch_positions(0), want[: len(want) // 16 * 16])
    assert not np.array_equal(want, epoch_order(labels, "resample", seed=0, epoch=0))   # 0.9 is not the default


# ---------------------------------------------------------------- LDAM's cosine head
def _head(cfg, data):
    from fasttrain.dataset import DatasetDir
    from fasttrain.methods.supervised import Supervised
    return type(Supervised(cfg, DatasetDir(data)).build_model().fc).__name__


def test_ldam_selects_the_cosine_head_unless_head_is_given(tiny_raw, tmp_path):
    from fasttrain.chain import parser
    from fasttrain.config import resolve

    def head(*argv, preset=None):
        args = parser("x").parse_args(["--data", str(tiny_raw), "--out", "unused", *map(str, argv)])
        return _head(resolve(args, preset), tiny_raw)
    assert Config().head == "auto"                         # "not given" is "auto", also in a saved config.yaml
    assert head("--loss", "ldam") == "NormedLinear" and head() == "Linear" and head("--loss", "focal") == "Linear"
    assert head("--loss", "ldam", "--head", "linear") == "Linear"
    assert head(preset=CIFAR | LDAM_DRW) == "NormedLinear" and "head" not in LDAM_DRW
    assert head("--head", "linear", preset=CIFAR | LDAM_DRW) == "Linear"
    yaml_ldam, yaml_linear = tmp_path / "ldam.yaml", tmp_path / "linear.yaml"
    yaml_ldam.write_text("loss: ldam\n")
    yaml_linear.write_text("loss: ldam\nhead: linear\n")
    assert head("--config", yaml_ldam) == "NormedLinear" and head("--config", yaml_linear) == "Linear"
    assert head("--config", yaml_ldam, "--loss", "ce") == "Linear"


def test_a_run_saved_with_head_linear_before_auto_existed_continues_under_the_same_command():
    """A chain re-run compares its stage's config with the saved one: `head: auto` and a saved `head: linear`
    build the same model unless the loss is LDAM."""
    assert Config(head="auto").changed_from(Config(head="linear")) == []
    assert Config(head="auto", loss="ldam").changed_from(Config(head="cosine", loss="ldam")) == []
    assert Config(head="auto", loss="ldam").changed_from(Config(head="linear", loss="ldam")) == ["head"]
    assert Config(head="cosine", loss="ldam").changed_from(Config(head="linear", loss="ldam")) == ["head"]


@pytest.mark.parametrize("given, built", [(None, "cosine"), ("linear", "linear")])
def test_a_resumed_ldam_run_keeps_the_head_it_was_trained_with(tiny_raw, tmp_path, given, built):
    """head: auto resumes as cosine with LDAM; head: linear + loss: ldam (every config.yaml written before
    --head auto existed) resumes as linear."""
    from fasttrain.chain import parser
    from fasttrain.config import resolve
    from fasttrain.engine import Engine
    from fasttrain.pseudo_label import load_classifier
    run = tmp_path / "run"
    head = {} if given is None else {"head": given}
    assert fit(tiny_raw, run, epochs=2, loss="ldam", stop_after_epochs=1, **head) == "stopped"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["loss"], saved["head"]) == ("ldam", given or "auto")
    cfg = resolve(parser("x").parse_args(["--resume", str(run)]))
    try:
        engine = Engine(cfg)
        assert _head(cfg, tiny_raw) == type(engine.model.fc).__name__ == {"cosine": "NormedLinear",
                                                                          "linear": "Linear"}[built]
        assert engine.fit() == "done"
    finally:
        reset_accelerate()
    assert torch.load(run / "model.pt", weights_only=True)["head"] == built   # model.pt: the head it holds
    model, _ = load_classifier(run)                                           # what pseudo-labelling builds
    assert type(model.fc).__name__ == {"cosine": "NormedLinear", "linear": "Linear"}[built]


# ---------------------------------------------------------------- cRT
def _bn_means(state):
    return {k: v for k, v in state.items() if k.endswith("running_mean") or k.endswith("running_var")}


@pytest.fixture(scope="module")
def base_run(tiny_raw, tmp_path_factory):
    base = tmp_path_factory.mktemp("base") / "run"
    fit(tiny_raw, base, epochs=1)
    return base


@pytest.mark.parametrize("freeze", [False, True])
def test_crt_keeps_bn_statistics_updating_unless_frozen(tiny_raw, base_run, tmp_path, freeze):
    base = base_run  # cRT with the class-aware sampler through a real loader
    fit(tiny_raw, tmp_path / "crt", method="crt", epochs=1, sampler="class_aware", crt_freeze_bn=freeze,
        pretrained=str(base / "backbone.pt"))
    before = torch.load(base / "model.pt", weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "crt" / "model.pt", weights_only=True)["state_dict"]
    params = {n for n, _ in _model_like().named_parameters()}
    for k, v in after.items():
        if k in params and not k.startswith("fc."):
            assert torch.equal(v, before[k]), f"parameter {k} changed although the backbone is frozen"
    changed = [k for k, v in _bn_means(after).items() if not torch.equal(v, before[k])]
    if freeze:
        assert changed == []
    else:
        assert len(changed) == len(_bn_means(after))                    # every BN layer kept updating
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


def _model_like():
    from fasttrain.models import build_model
    return build_model("resnet20", 4, width=0.5)


# ---------------------------------------------------------------- presets: batch and lr
def test_presets_are_the_papers_configs_and_scale_lr_linearly():
    for preset, batch, wd, epochs in [(IMAGENET_LT, 128, 5e-4, 90), (INAT, 100, 1e-4, 90),
                                      (CRT_IMAGENET_LT, 512, 5e-4, 10), (CRT_INAT, 512, 1e-4, 30)]:
        cfg = Config().update(preset)
        assert (cfg.batch_size, cfg.lr, cfg.effective_lr(), cfg.weight_decay, cfg.epochs, cfg.schedule) == \
            (batch, 0.2, 0.2, wd, epochs, "cosine")
        assert Config().update(preset | {"batch_size": 1024}).effective_lr() == pytest.approx(0.2 * 1024 / batch)
    for preset in (CRT_IMAGENET_LT, CRT_INAT):
        assert (preset["method"], preset["sampler"], preset["samples_per_class"]) == ("crt", "class_aware", 4)
    moco = Config().update(MOCO)
    assert (moco.epochs, moco.batch_size, moco.effective_lr(), moco.weight_decay) == (200, 128, 0.015, 1e-4)
    assert Config().update(IMAGENET_LT | {"batch_size": 1024, "grad_accum": 2}).effective_lr() == pytest.approx(3.2)
    line = batch_and_lr(Config().update(IMAGENET_LT | {"batch_size": 1024}), 8)
    assert "8 process(es) x 128 per process" in line and "lr 1.6 = 0.2 x 1024 / 128" in line
    assert "reference: lr 0.2 at batch 128" in line


def test_recipe_prints_global_and_per_process_batch_the_lr_and_the_schedule(tiny_raw, tmp_path):
    r = subprocess.run([sys.executable, "recipes/supervised_inat.py", "--data", str(tiny_raw), "--out",
                        str(tmp_path / "run"), "--epochs", "1", "--arch", "resnet20", "--width", "0.25",
                        "--batch-size", "16", "--workers", "1", "--precision", "no", "--channels-last", "false",
                        "--loader", "device", "--eval-size", "16", "--image-size", "16"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "batch 16 per optimiser step = 1 process(es) x 16 per process" in out
    assert "lr 0.032 = 0.2 x 16 / 100 (reference: lr 0.2 at batch 100" in out
    assert out.count("per optimiser step") == 1
    # one epoch of iNat's cosine-at-e/T schedule trains at lr 0: said once, at the start, with a warning
    assert out.count("lr by epoch") == 1 and out.index("lr by epoch") < out.index("epoch 1/1")
    assert "lr by epoch (base 0.032): 1: 0 -- WARNING: no epoch trains within 10% of the base lr 0.032" in out


# ---------------------------------------------------------------- metrics.json: final and best
def _jsonl(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_without_val_the_best_epoch_is_selected_on_test(tiny_raw, tmp_path, capsys):
    run = tmp_path / "run"
    fit(tiny_raw, run, epochs=2, lr=0.2)
    m, log = json.loads((run / "metrics.json").read_text()), _jsonl(run)
    tops = [r["eval_top1"] for r in log]
    assert [r["eval_split"] for r in log] == ["test"] * 2
    assert m["final"]["epoch"] == 1 and m["final"]["split"] == "test" and m["final"]["top1"] == tops[1] == m["top1"]
    best = m["best"]
    assert (best["selected_on"], best["split"], best["epoch"]) == ("test", "test", int(np.argmax(tops)))
    assert best["top1"] == pytest.approx(max(tops)) and m["best_epoch"] == best["epoch"]
    assert "best test epoch" in best["label"] and "as the paper reports" in best["label"]
    assert {"top5", "many", "medium", "few", "per_class"} <= set(best) and len(best["per_class"]) == 4
    printed = capsys.readouterr().out
    assert "final epoch (epoch 2/2, test)" in printed and "best test epoch" in printed


def test_with_val_the_best_epoch_is_selected_on_val_and_test_is_reported(tiny_raw_val, tmp_path, monkeypatch,
                                                                         capsys):
    import fasttrain.engine as engine_module
    real, scripted = engine_module.evaluate, iter([50.0, 90.0, 70.0])

    def evaluate(model, loader, *args, **kwargs):  # val top-1 scripted so that the best epoch is not the last
        metrics, confusion = real(model, loader, *args, **kwargs)
        if loader.split.name == "val":
            metrics["top1"] = next(scripted)
        return metrics, confusion

    monkeypatch.setattr(engine_module, "evaluate", evaluate)
    run = tmp_path / "run"
    fit(tiny_raw_val, run, epochs=3, lr=0.2)
    m, log = json.loads((run / "metrics.json").read_text()), _jsonl(run)
    assert [r["eval_split"] for r in log] == ["val"] * 3 and [r["eval_top1"] for r in log] == [50, 90, 70]
    assert (m["final"]["split"], m["final"]["epoch"]) == ("test", 2) and m["num_eval_images"] == 64
    best = m["best"]
    assert (best["selected_on"], best["split"], best["epoch"], best["selection_top1"]) == ("val", "test", 1, 90.0)
    assert "best val epoch" in best["label"] and "test" in best["label"]
    # the best block is the test split evaluated with the best-val checkpoint's weights
    assert best["top1"] == pytest.approx(_test_top1(tiny_raw_val, run / "checkpoints" / "best"))
    assert m["final"]["top1"] == pytest.approx(_test_top1(tiny_raw_val, run / "checkpoints" / "last"))
    model = torch.load(run / "model.pt", weights_only=True)["state_dict"]  # the final model is what is exported
    last, best_weights = _weights(run / "checkpoints" / "last"), _weights(run / "checkpoints" / "best")
    assert all(torch.equal(v, last[k]) for k, v in model.items())
    backbone = torch.load(run / "backbone.pt", weights_only=True)["state_dict"]
    backbone_best = torch.load(run / "backbone_best.pt", weights_only=True)["state_dict"]
    assert backbone.keys() == backbone_best.keys() and "conv1.weight" in backbone
    assert all(torch.equal(v, last[k]) for k, v in backbone.items())
    assert all(torch.equal(v, best_weights[k]) for k, v in backbone_best.items())
    assert not all(torch.equal(v, backbone[k]) for k, v in backbone_best.items())
    assert "best val epoch" in capsys.readouterr().out


def _weights(ckpt):
    from safetensors.torch import load_file
    return load_file(str(next(ckpt.glob("model*.safetensors"))))


def _test_top1(data, ckpt):
    from fasttrain.data import augment, build_loader
    from fasttrain.dataset import DatasetDir
    from fasttrain.evaluate import evaluate
    from fasttrain.models import build_model
    ds = DatasetDir(data)
    model = build_model("resnet20", 4, width=0.5)
    model.load_state_dict(_weights(ckpt))
    loader = build_loader(ds, "test", kind="device", batch_size=16, views=[augment.small_eval()], train=False,
                          workers=1)
    return evaluate(model, loader, 4, ds.split("train").class_counts)[0]["top1"]


def test_imagenet_lt_training_crops_have_the_papers_colour_jitter():
    from types import SimpleNamespace

    from fasttrain.methods.supervised import Supervised
    jpeg = SimpleNamespace(is_raw=False)
    (view,) = Supervised(Config().update(IMAGENET_LT), jpeg).views(train=True)
    assert (view.crop, view.size, view.flip) == ("rrc", 224, True)
    assert (view.jitter, view.jitter_p) == ((0.4, 0.4, 0.4, 0.0), 1.0)
    (inat,) = Supervised(Config().update(INAT), jpeg).views(train=True)
    assert inat.jitter is None and not inat.has_color_ops
    (evaluation,) = Supervised(Config().update(IMAGENET_LT), jpeg).views(train=False)
    assert evaluation.jitter is None and evaluation.crop == "center"
