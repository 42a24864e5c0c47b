"""MoCo v2: queue and pointer, momentum update, InfoNCE logits, shuffling BN (one device and two
processes), the method's model / views / checks, and the exported backbone in a classifier."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import conftest
from conftest import launch_two_processes, mark_metrics, resumed_at
from fasttrain.config import Config
from fasttrain.dataset import DatasetDir
from fasttrain.methods.moco import MoCo, MoCoModel
from fasttrain.models import build_model, load_pretrained

HERE = Path(__file__).parent
MOCO = dict(method="moco", moco_dim=8, moco_queue=64, moco_shuffle_groups=2)


def fit(data, out, **overrides) -> str:
    return conftest.fit(data, out, **(MOCO | overrides))


def linear_moco(queue_size=8, dim=2, **kwargs):
    return MoCoModel(nn.Linear(3, dim, bias=False), dim, queue_size=queue_size, **kwargs)


def test_enqueue_replaces_the_oldest_keys_and_wraps_around():
    moco = linear_moco(queue_size=6)
    moco.queue.zero_()
    moco.enqueue(torch.ones(4, 2))
    assert moco.queue_ptr.item() == 4 and moco.queue[:, 0].tolist() == [1, 1, 1, 1, 0, 0]
    moco.enqueue(torch.full((4, 2), 2.0))          # rows 4, 5, then 0, 1
    assert moco.queue_ptr.item() == 2 and moco.queue[:, 0].tolist() == [2, 2, 1, 1, 2, 2]
    moco = linear_moco(queue_size=8)
    for step in range(3):                           # 8 = 2 x 4: the pointer goes 4, 0, 4
        moco.enqueue(torch.full((4, 2), float(step)))
        assert moco.queue_ptr.item() == [4, 0, 4][step]
    assert moco.queue[:, 0].tolist() == [2, 2, 2, 2, 1, 1, 1, 1]


def test_queue_starts_normalised_and_is_checkpointed():
    moco = linear_moco(queue_size=16, dim=4)
    assert torch.allclose(moco.queue.norm(dim=1), torch.ones(16))
    assert {"queue", "queue_ptr"} <= set(moco.state_dict())


def test_momentum_update_against_hand_computed_values():
    moco = linear_moco(momentum=0.9)
    assert torch.equal(moco.encoder_k.weight, moco.encoder_q.weight)    # a copy at the start...
    assert not moco.encoder_k.weight.requires_grad                         # ...without gradient
    with torch.no_grad():
        moco.encoder_q.weight.fill_(1.0)
        moco.encoder_k.weight.fill_(0.0)
    moco.momentum_update()
    assert torch.allclose(moco.encoder_k.weight, torch.full((2, 3), 0.1))           # 0.9 * 0 + 0.1 * 1
    with torch.no_grad():
        moco.encoder_q.weight.fill_(3.0)
    moco.momentum_update()
    assert torch.allclose(moco.encoder_k.weight, torch.full((2, 3), 0.9 * 0.1 + 0.1 * 3))
    assert torch.equal(moco.encoder_q.weight, torch.full((2, 3), 3.0))


def test_infonce_logits_have_the_positive_at_index_0():
    torch.manual_seed(0)
    moco = linear_moco(queue_size=8, dim=2, temperature=0.2, shuffle_groups=1)
    queue = moco.queue.clone()
    x = torch.randn(4, 3)
    logits = moco(x, x)                             # same image for query and key: positive = 1 / T
    q = F.normalize(moco.encoder_q(x), dim=1)
    assert logits.shape == (4, 1 + 8)
    assert torch.allclose(logits[:, 0], torch.full((4,), 1 / 0.2))
    assert torch.allclose(logits[:, 1:], q @ queue.T / 0.2, atol=1e-6)
    assert (logits.argmax(1) == 0).all()
    assert torch.allclose(moco.queue[:4], q.detach(), atol=1e-6)   # the keys went into the queue
    logits.sum().backward()                          # gradient reaches the query encoder only
    assert moco.encoder_q.weight.grad is not None and moco.encoder_k.weight.grad is None


@pytest.mark.parametrize("groups", [1, 4])
def test_shuffle_bn_emulation_uses_per_sub_batch_statistics(groups):
    torch.manual_seed(0)
    moco = MoCoModel(nn.BatchNorm1d(3, affine=False), 3, queue_size=16, shuffle_groups=groups)
    seen = []
    moco.encoder_k.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    x = torch.randn(16, 3) * 3 + 1
    keys, all_keys = moco.keys(x)
    assert torch.equal(keys, all_keys) and keys.shape == (16, 3)
    assert [len(s) for s in seen] == [16 // groups] * groups
    rows = torch.cat(seen)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, x.tolist()))   # a partition of the batch
    for part in seen:                                    # each key normalised with its own sub-batch
        expected = F.normalize((part - part.mean(0)) / torch.sqrt(part.var(0, unbiased=False) + 1e-5), dim=1)
        for row, key in zip(part, expected):
            i = (x == row).all(1).nonzero().item()
            assert torch.allclose(keys[i], key, atol=1e-5)
    whole = F.normalize((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5), dim=1)
    assert torch.allclose(keys, whole, atol=1e-5) == (groups == 1)


@pytest.fixture
def method(tiny_raw):
    return MoCo(Config(data=str(tiny_raw)).update(conftest.TINY_RUN | MOCO | {"moco_dim": 128}), DatasetDir(tiny_raw))


def test_model_views_and_trainable_parameters(method):
    model = method.build_model()
    d = model.encoder_q.feature_dim
    fc = model.encoder_q.fc
    assert isinstance(fc, nn.Sequential) and isinstance(fc[1], nn.ReLU)
    assert (fc[0].in_features, fc[0].out_features, fc[2].in_features, fc[2].out_features) == (d, d, d, 128)
    assert model.queue.shape == (64, 128) and model.queue_ptr.item() == 0
    trainable = method.trainable_parameters(model)
    assert {id(p) for p in trainable} == {id(p) for p in model.encoder_q.parameters()}
    assert not any(p.requires_grad for p in model.encoder_k.parameters())
    views = method.views(train=True)
    assert len(views) == 2 and all(v.crop == "rrc" and v.size == 16 and v.scale == (0.2, 1.0) for v in views)
    assert method.num_outputs() == 128 and not method.evaluates


def test_setup_checks_queue_and_shuffle_groups(method):
    def engine(per_process, processes=1):
        acc = SimpleNamespace(num_processes=processes, unwrap_model=lambda m: m)
        return SimpleNamespace(accelerator=acc, per_process_batch=per_process, model=None)
    method.setup(engine(16))                                    # 64 = 4 x 16
    with pytest.raises(ValueError, match="multiple of the global batch 48"):
        method.setup(engine(24, processes=2))
    with pytest.raises(ValueError, match="shuffle-groups 2"):
        method.setup(engine(2))


def test_exported_query_encoder_loads_into_a_classifier(method, tmp_path):
    model = method.build_model()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)                                         # query and key encoders now differ
    method.export(model, tmp_path)
    classifier = build_model("resnet20", 10, width=0.5)
    fresh_fc = {k: v.clone() for k, v in classifier.fc.state_dict().items()}
    report = load_pretrained(classifier, tmp_path / "backbone.pt")
    assert report.missing == [] and report.unexpected == []
    query = model.encoder_q.state_dict()
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, fresh_fc[k[3:]] if k.startswith("fc.") else query[k]), k


def test_moco_run_trains_and_feeds_a_supervised_run(tiny_raw, tmp_path):
    assert fit(tiny_raw, tmp_path / "moco") == "done"
    backbone = tmp_path / "moco" / "backbone.pt"
    assert fit(tiny_raw, tmp_path / "ce", method="supervised", pretrained=str(backbone)) == "done"
    log = json.loads((tmp_path / "moco" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= log["infonce_acc"] <= 1 and log["loss"] > 0
    saved = torch.load(tmp_path / "moco" / "model.pt", weights_only=True)["state_dict"]
    assert saved["queue_ptr"].item() == (90 // 16) * 16 % 64      # 5 steps of 16 keys
    assert (tmp_path / "ce" / "metrics.json").exists()


def test_stopped_and_resumed_run_equals_uninterrupted(tiny_raw, tmp_path, capsys):
    part = tmp_path / "part"
    assert fit(tiny_raw, tmp_path / "full", epochs=3) == "done"
    assert fit(tiny_raw, part, epochs=3, stop_after_epochs=1) == "stopped"
    before = mark_metrics(part)
    capsys.readouterr()
    assert fit(tiny_raw, part, epochs=3, resume=str(part)) == "done"
    assert resumed_at(capsys.readouterr().out, part) == (1, 5, 0, "last")           # 5 steps of 16 per epoch
    assert (part / "metrics.jsonl").read_text().splitlines()[:1] == before
    full, part = (torch.load(tmp_path / r / "model.pt", weights_only=True)["state_dict"] for r in ("full", "part"))
    assert all(torch.equal(full[k], part[k]) for k in full)      # weights, key encoder, queue and pointer


@pytest.mark.slow
def test_two_processes_gather_keys_from_both_ranks_into_one_queue(tmp_path):
    launch_two_processes(HERE / "scripts" / "moco_two_procs.py", tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    n = len(r0["keys"])
    # after the first step the queue holds rank 0's keys, then rank 1's, on both ranks
    for r in (r0, r1):
        assert r["ptr_after_first"] == 2 * n
        assert torch.allclose(r["queue_after_first"][:n], r0["keys"], atol=1e-5)
        assert torch.allclose(r["queue_after_first"][n:2 * n], r1["keys"], atol=1e-5)
        assert torch.allclose(r["positives"], r["expected_positives"], atol=1e-5)   # unshuffled correctly
    assert not torch.allclose(r0["keys"], r1["keys"])
    # after a training step (shuffling BN across ranks, backward, momentum update): still identical
    for k in ("queue", "queue_ptr", "encoder_q", "encoder_k"):
        for name in r0[k] if isinstance(r0[k], dict) else [None]:
            a, b = (r[k][name] if name else r[k] for r in (r0, r1))
            assert torch.equal(a, b), (k, name)
    assert r0["queue_ptr"].item() == 4 * n
