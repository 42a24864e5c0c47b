import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasttrain.losses import (LOSSES, REWEIGHTS, BalancedSoftmaxLoss, CrossEntropy, FocalLoss, LDAMLoss,
                              LogitAdjustedLoss, build_loss, class_balanced_weights, ldam_margins)

COUNTS = [100, 10, 1]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])


def test_cross_entropy(batch):
    logits, targets = batch
    w = torch.tensor([0.2, 1.0, 3.0])
    assert torch.allclose(CrossEntropy()(logits, targets), F.cross_entropy(logits, targets))
    assert torch.allclose(CrossEntropy(w)(logits, targets), F.cross_entropy(logits, targets, weight=w))


def test_focal(batch):
    logits, targets = batch
    assert torch.allclose(FocalLoss(gamma=0)(logits, targets), F.cross_entropy(logits, targets))
    p = logits.softmax(1)[torch.arange(8), targets]
    expected = (-(1 - p) ** 2 * p.log()).mean()
    assert torch.allclose(FocalLoss(gamma=2)(logits, targets), expected)


def test_class_balanced_weights():
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta ** n) for n in COUNTS]
    expected = [3 * r / sum(raw) for r in raw]
    w = class_balanced_weights(COUNTS, beta)
    assert w.dtype == torch.float32 and torch.allclose(w, torch.tensor(expected))
    assert math.isclose(w.sum().item(), 3, rel_tol=1e-6) and w[2] > w[1] > w[0]
    assert torch.equal(class_balanced_weights(COUNTS, 0.0), torch.ones(3))
    w0 = class_balanced_weights(np.array([100, 0, 1]), beta)      # zero-count class: weight 0, sum C
    assert w0[1] == 0 and math.isclose(w0.sum().item(), 3, rel_tol=1e-6)
    with pytest.raises(ValueError):
        class_balanced_weights(COUNTS, 1.0)
    with pytest.raises(ValueError):
        class_balanced_weights([0, 0])


def test_ldam_margins_and_loss(batch):
    m = ldam_margins(COUNTS, 0.5)
    assert torch.allclose(m, torch.tensor([0.5 * 100 ** -0.25, 0.5 * 10 ** -0.25, 0.5]))   # 0.1581, 0.2812, 0.5
    assert torch.allclose(ldam_margins([16, 0, 1], 0.5), torch.tensor([0.25, 0.0, 0.5]))
    logits, targets = batch
    adjusted = logits.clone()
    for i, t in enumerate(targets):
        adjusted[i, t] -= m[t]
    w = torch.tensor([0.5, 1.0, 2.0])
    loss = LDAMLoss(COUNTS, max_margin=0.5, scale=30, weight=w)
    assert torch.allclose(loss(logits, targets), F.cross_entropy(30 * adjusted, targets, weight=w))


def test_balanced_softmax_and_logit_adjustment(batch):
    logits, targets = batch
    log_prior = torch.log(torch.tensor(COUNTS, dtype=torch.float32) / 111)
    assert torch.allclose(BalancedSoftmaxLoss(COUNTS)(logits, targets), F.cross_entropy(logits + log_prior, targets))
    assert torch.allclose(LogitAdjustedLoss(COUNTS, tau=2.0)(logits, targets),
                          F.cross_entropy(logits + 2 * log_prior, targets))
    assert torch.isfinite(BalancedSoftmaxLoss([5, 0, 1])(logits, targets))


def test_drw_switches_at_epoch(batch):
    logits, targets = batch
    w = class_balanced_weights(COUNTS, 0.9999)
    loss = build_loss('ce', COUNTS, reweight='drw', drw_epoch=160)
    plain, weighted = F.cross_entropy(logits, targets), F.cross_entropy(logits, targets, weight=w)
    assert torch.allclose(loss(logits, targets, 0), plain) and torch.allclose(loss(logits, targets, 159), plain)
    assert torch.allclose(loss(logits, targets, 160), weighted) and torch.allclose(loss(logits, targets, 199), weighted)
    cb = build_loss('ce', COUNTS, reweight='cb', drw_epoch=160)
    assert torch.allclose(cb(logits, targets, 0), weighted)
    none = build_loss('ce', COUNTS, reweight='none', drw_epoch=160)
    assert torch.allclose(none(logits, targets, 199), plain)


def test_build_loss_options(batch):
    logits, targets = batch
    ldam = build_loss('ldam', COUNTS, reweight='drw', drw_epoch=1, ldam_max_margin=0.3, ldam_scale=10.0)
    assert torch.allclose(ldam(logits, targets, 0), LDAMLoss(COUNTS, 0.3, 10.0)(logits, targets))
    focal = build_loss('focal', COUNTS, reweight='none', drw_epoch=0, focal_gamma=2.0)
    assert torch.allclose(focal(logits, targets, 0), FocalLoss(2.0)(logits, targets))
    la = build_loss('logit_adjust', COUNTS, reweight='cb', drw_epoch=0, la_tau=0.5, cb_beta=0.999)
    assert torch.allclose(la(logits, targets, 0),
                          LogitAdjustedLoss(COUNTS, 0.5, class_balanced_weights(COUNTS, 0.999))(logits, targets))
    with pytest.raises(ValueError, match='ce, focal, ldam, balanced_softmax, logit_adjust'):
        build_loss('hinge', COUNTS, reweight='none', drw_epoch=0)
    with pytest.raises(ValueError, match='none, cb, drw'):
        build_loss('ce', COUNTS, reweight='resample', drw_epoch=0)
    with pytest.raises(ValueError, match='logits have 3 classes, class_counts has 4'):
        build_loss('ce', [1, 2, 3, 4], reweight='none', drw_epoch=0)(logits, targets, 0)


def test_is_module_with_buffers():
    loss = build_loss('ldam', COUNTS, reweight='drw', drw_epoch=5)
    names = dict(loss.named_buffers())
    assert {'loss.margins', 'reweighted.margins', 'reweighted.weight'} <= names.keys()
    loss.to('meta')   # buffers follow the module to its device
    assert all(b.device.type == 'meta' for b in loss.buffers())


@pytest.mark.parametrize('name', LOSSES)
@pytest.mark.parametrize('reweight', REWEIGHTS)
def test_bf16_autocast_loss_is_computed_in_float32_with_finite_gradients(name, reweight):
    layer = torch.nn.Linear(16, 3)
    x, targets = torch.randn(32, 16), torch.randint(0, 3, (32,))
    loss_fn = build_loss(name, COUNTS, reweight=reweight, drw_epoch=1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, targets, 1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # the same value as the loss of the bf16 logits cast to float32 outside autocast: nothing rounds to bf16
    assert torch.equal(loss, loss_fn(logits.detach().float(), targets, 1))
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
