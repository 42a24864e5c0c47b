"""Rotation SSP: one rotation per image with balanced shuffled labels, no class label used, the backbone
feeds a classifier."""
from __future__ import annotations

import json

import pytest
import torch

import conftest
from fasttrain.config import Config
from fasttrain.data.batch import Batch
from fasttrain.dataset import DatasetDir
from fasttrain.methods.rotation import Rotation, rotations
from fasttrain.models import build_model, load_pretrained

def fit(data, out, **overrides):
    assert conftest.fit(data, out, **overrides) == "done"


def test_torch_rot90_turns_counter_clockwise():
    image = torch.tensor([[1., 2.], [3., 4.]]).view(1, 1, 2, 2)
    # k=1 puts the top-right pixel at the top-left, as the labels of `rotations` count quarter turns
    assert [torch.rot90(image, k, dims=(2, 3))[0, 0].tolist() for k in range(4)] == \
        [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]


@pytest.mark.parametrize("n", [128, 10, 3])
def test_one_rotation_per_image_with_balanced_shuffled_labels(n):
    x = torch.randn(n, 2, 5, 5)
    rotated, labels = rotations(x, torch.Generator().manual_seed(n))
    assert rotated.shape == x.shape and labels.shape == (n,) and labels.dtype == torch.long
    counts = torch.bincount(labels, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n      # balanced: arange(4) repeated to n
    for i in range(n):                                                 # each image once, in place, by its label
        assert torch.equal(rotated[i], torch.rot90(x[i], int(labels[i]), dims=(1, 2))), i
    if n >= 8:                                                         # shuffled, and a fresh draw each step
        assert not torch.equal(labels, labels.sort().values)
        assert not torch.equal(labels, rotations(x, torch.Generator().manual_seed(n + 1))[1])
    again = rotations(x, torch.Generator().manual_seed(n))
    assert torch.equal(again[0], rotated) and torch.equal(again[1], labels)


def test_rotations_keep_channels_last_and_need_square_images():
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert rotations(x)[0].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="square"):
        rotations(torch.randn(2, 3, 4, 6))


def test_loss_is_4_way_and_ignores_class_labels(tiny_raw):
    method = Rotation(Config(data=str(tiny_raw)).update(conftest.TINY_RUN | {"head": "cosine"}), DatasetDir(tiny_raw))
    assert method.num_outputs() == 4 and not method.evaluates
    model = method.build_model()
    assert isinstance(model.fc, torch.nn.Linear)              # the thrown-away rotation head is always linear
    images = torch.randn(8, 3, 16, 16)
    unlabeled, labeled = (Batch((images,), labels, torch.arange(8)) for labels in
                          (torch.full((8,), -1), torch.randint(0, 4, (8,))))
    torch.manual_seed(0)
    loss_a, logs = method.loss(model, unlabeled, 0)
    torch.manual_seed(0)                                     # the same rotations: the class labels change nothing
    loss_b, _ = method.loss(model, labeled, 0)
    assert torch.equal(loss_a, loss_b) and set(logs) == {"loss", "rotation_acc"}
    assert 0 <= logs["rotation_acc"] <= 1
    loss_a.backward()
    assert model.fc.weight.grad.shape == (4, model.feature_dim)


def test_rotation_run_exports_a_backbone_that_a_classifier_loads(tiny_raw, tmp_path):
    fit(tiny_raw, tmp_path / "rot", method="rotation")
    run = tmp_path / "rot"
    assert (run / "backbone.pt").exists() and not (run / "metrics.json").exists()   # no class evaluation
    assert "rotation_acc" in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    ssp = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    classifier = build_model("resnet20", 4, width=0.5)
    fresh_fc = {k: v.clone() for k, v in classifier.fc.state_dict().items()}
    report = load_pretrained(classifier, run / "backbone.pt")
    assert report.missing == [] and report.loaded == len([k for k in ssp if not k.startswith("fc.")])
    for k, v in classifier.state_dict().items():
        if k.startswith("fc."):
            assert torch.equal(v, fresh_fc[k[3:]])            # the head stays as initialised
        else:
            assert torch.equal(v, ssp[k]), k
    # the supervised stage starts from it through the engine's --pretrained: backbone loaded, head fresh
    from fasttrain.engine import Engine
    engine = Engine(Config(data=str(tiny_raw), out=str(tmp_path / "ce")).update(
        conftest.TINY_RUN | {"pretrained": str(run / "backbone.pt")}))
    start = engine.accelerator.unwrap_model(engine.model).state_dict()
    assert all(torch.equal(v.cpu(), ssp[k]) for k, v in start.items() if not k.startswith("fc."))
    assert start["fc.weight"].shape == (4, classifier.feature_dim)
