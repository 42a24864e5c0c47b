"""`--compile true` end to end: the files a compiled run saves (model.pt, backbone.pt) load into an uncompiled
model, into `--pretrained` of another method, and into pseudo-labelling.

torch.compile is run with the `eager` backend here: the wrapper (`OptimizedModule`, `_orig_mod.` key prefixes)
is what decides how the files look, and inductor's code generation would take minutes on two CPU cores.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fasttrain.data import augment, build_loader
from fasttrain.dataset import DatasetDir
from fasttrain.pseudo_label import pseudo_label
from fasttrain.models import build_model, load_pretrained

from conftest import fit

TINY = dict(arch="resnet20", width=0.25, epochs=1, batch_size=32)


@pytest.fixture
def eager_compile(monkeypatch):
    real = torch.compile
    calls = []

    def compile_eager(model, **kwargs):
        calls.append(model)
        return real(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", functools.wraps(real)(compile_eager))
    return calls


def test_compiled_run_files_load_everywhere(tiny_raw, tmp_path, eager_compile):
    base = tmp_path / "base"
    assert fit(tiny_raw, base, compile=True, **TINY) == "done"
    assert len(eager_compile) == 1                                      # the run really was compiled
    saved = torch.load(base / "model.pt", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in saved["state_dict"])
    plain = build_model(saved["arch"], saved["num_classes"], in_channels=saved["in_channels"],
                        width=saved["width"], head=saved["head"])
    plain.load_state_dict(saved["state_dict"])                          # strict: every key, no prefix
    report = load_pretrained(build_model("resnet20", 4, width=0.25), base / "backbone.pt")
    assert report.loaded > 0 and report.missing == [] and report.unexpected == []

    crt = tmp_path / "crt"                                              # --pretrained of another method
    assert fit(tiny_raw, crt, method="crt", pretrained=str(base / "backbone.pt"), compile=True, **TINY) == "done"
    crt_state = torch.load(crt / "model.pt", weights_only=True)["state_dict"]
    assert torch.equal(crt_state["conv1.weight"], saved["state_dict"]["conv1.weight"])   # frozen backbone

    table = np.load(pseudo_label(base, tiny_raw, tmp_path / "pseudo", loader="device", workers=1))
    plain.eval()                                                        # the saved model's own argmax, per image
    loader = build_loader(DatasetDir(tiny_raw), "unlabeled", kind="device", batch_size=64,
                          views=[augment.small_eval()], train=False, workers=1)
    with torch.no_grad():
        expected = torch.cat([plain(batch.images).argmax(1) for batch in loader]).numpy()
    assert len(table["label"]) == 160 and np.array_equal(table["label"], expected)
