import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fasttrain.models import (ARCHS, NormedLinear, PretrainedMismatch, backbone_state_dict, build_model,
                              load_pretrained, save_backbone)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def fresh_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def randomize(model):
    """Distinct, non-init values everywhere (BN buffers included) so a load is observable."""
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.uniform_(0.5, 1.5)
    return model


# Reference numbers of torchvision.models (resnet18/50, 1000 classes) and of He et al. 2016, table 6
# (CIFAR ResNets, 10 classes, option-A shortcuts).
@pytest.mark.parametrize('arch, num_classes, params, keys', [
    ('resnet50', 1000, 25_557_032, 320), ('resnet18', 1000, 11_689_512, 122),
    ('resnet10', 1000, 5_418_792, 74), ('resnet32', 10, 464_154, 188), ('resnet20', 10, 269_722, 116),
    ('resnet44', 10, 658_586, 260), ('resnet56', 10, 853_018, 332)])
def test_parameter_counts(arch, num_classes, params, keys):
    model = build_model(arch, num_classes)
    assert n_params(model) == params
    assert len(model.state_dict()) == keys


def test_resnet50_torchvision_names_and_shapes():
    sd = build_model('resnet50', 1000).state_dict()
    expected = {
        'conv1.weight': (64, 3, 7, 7), 'bn1.running_mean': (64,), 'bn1.num_batches_tracked': (),
        'layer1.0.conv1.weight': (64, 64, 1, 1), 'layer1.0.conv2.weight': (64, 64, 3, 3),
        'layer1.0.conv3.weight': (256, 64, 1, 1), 'layer1.0.downsample.0.weight': (256, 64, 1, 1),
        'layer1.0.downsample.1.running_var': (256,), 'layer2.0.downsample.0.weight': (512, 256, 1, 1),
        'layer3.5.bn3.bias': (1024,), 'layer4.2.bn3.running_var': (2048,),
        'layer4.2.conv3.weight': (2048, 512, 1, 1), 'fc.weight': (1000, 2048), 'fc.bias': (1000,)}
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert 'layer1.1.downsample.0.weight' not in sd and 'layer4.3.conv1.weight' not in sd
    model = build_model('resnet50', 1000)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5


def test_resnet18_and_resnet10_names():
    sd18 = build_model('resnet18', 1000).state_dict()
    assert {'layer1.1.bn2.running_var', 'layer2.0.downsample.0.weight', 'layer4.1.conv2.weight'} <= sd18.keys()
    assert 'layer1.0.downsample.0.weight' not in sd18
    sd10 = build_model('resnet10', 1000).state_dict()
    assert sd10.keys() == {k for k in sd18 if not k.startswith(('layer1.1', 'layer2.1', 'layer3.1', 'layer4.1'))}


@pytest.mark.parametrize('arch, size, dim', [('resnet32', 28, 64), ('resnet20', 32, 64), ('resnet10', 64, 512),
                                             ('resnet18', 64, 512), ('resnet50', 64, 2048)])
@pytest.mark.parametrize('in_channels', [1, 3])
def test_forward_shapes(arch, size, dim, in_channels):
    model = build_model(arch, 7, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, dim) and model.feature_dim == dim
        assert torch.allclose(model(x), model.fc(feats))
    assert model(x).shape == (2, 7) and model.arch == arch


@pytest.mark.parametrize('width, widths', [(0.5, (8, 16, 32)), (1.5, (24, 48, 96)), (2, (32, 64, 128))])
def test_width_multiplier(width, widths):
    model = build_model('resnet32', 10, width=width)
    assert (model.conv1.out_channels, model.layer2[0].conv1.out_channels, model.feature_dim) == widths
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.fc.in_features == widths[2]


def test_cifar_depths_and_option_a_shortcut():
    assert [len(build_model(a, 10).layer1) for a in ('resnet20', 'resnet32', 'resnet44', 'resnet56')] == [3, 5, 7, 9]
    block = build_model('resnet32', 10).layer2[0]
    x = torch.randn(2, 16, 8, 8)
    y = block.shortcut(x)   # parameter-free: subsample, then zero channels on both sides
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and not y[:, :8].any() and not y[:, 24:].any()


def test_cosine_head():
    model = build_model('resnet32', 10, head='cosine')
    assert isinstance(model.fc, NormedLinear) and model.fc.weight.shape == (10, 64)
    assert torch.allclose(model.fc.weight.norm(dim=1), torch.ones(10))
    out = model(torch.randn(4, 3, 32, 32))
    assert out.abs().max() <= 1 + 1e-5
    model.fc.reset_parameters()


def test_invalid_options():
    with pytest.raises(ValueError, match='resnet32.*resnet50'):
        build_model('resnet34', 10)
    with pytest.raises(ValueError, match='cosine'):
        build_model('resnet32', 10, head='mlp')
    with pytest.raises(ValueError, match='width'):
        build_model('resnet18', 10, width=2.0)
    assert set(ARCHS) == {'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet10', 'resnet18', 'resnet50'}


def test_zero_init_residual():
    model = build_model('resnet50', 10, zero_init_residual=True)
    assert not model.layer3[2].bn3.weight.any() and model.layer3[2].bn2.weight.all()
    assert not build_model('resnet18', 10, zero_init_residual=True).layer1[1].bn2.weight.any()


@pytest.mark.parametrize('arch, size', [('resnet32', 32), ('resnet18', 64)])
@pytest.mark.parametrize('head', ['linear', 'cosine'])
def test_channels_last_bf16_autocast(arch, size, head):
    """The same function in every layout and precision: channels_last fp32 equals the contiguous model, bf16
    autocast stays within bf16's rounding of it (measured: at most 4% of the largest logit)."""
    torch.manual_seed(0)
    model = build_model(arch, 5, head=head)
    x = torch.randn(4, 3, size, size)
    reference = model(x)
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    assert torch.allclose(model(x), reference, rtol=1e-4, atol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == (torch.float32 if head == 'cosine' else torch.bfloat16)
    assert (out.float() - reference).abs().max() <= 0.1 * reference.abs().max()
    nn.functional.cross_entropy(out.float(), torch.arange(4) % 5).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- backbone files, load_pretrained

def assert_backbone_loaded(model, source, fc_before):
    for k, v in backbone_state_dict(source).items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fc_before.items() if k.startswith('fc.'))


def test_backbone_state_dict_has_no_fc():
    model = build_model('resnet32', 10)
    sd = backbone_state_dict(model)
    assert not any(k.startswith('fc.') for k in sd) and len(sd) == len(model.state_dict()) - 2
    assert backbone_state_dict(ddp_like(model)).keys() == sd.keys()   # keys come back unprefixed


def ddp_like(model):
    wrapper = nn.Module()
    wrapper.module = model
    return wrapper


def test_wrapped_models_save_and_load(tmp_path):
    source = randomize(build_model('resnet20', 10))
    save_backbone(ddp_like(source), tmp_path / 'backbone.pt')
    assert torch.load(tmp_path / 'backbone.pt', weights_only=True)['arch'] == 'resnet20'
    model = build_model('resnet20', 10)
    before = fresh_copy(model)
    report = load_pretrained(ddp_like(model), tmp_path / 'backbone.pt')
    assert report.missing == [] and report.unexpected == []
    assert_backbone_loaded(model, source, before)


def test_load_moco_checkpoint(tmp_path):
    source = randomize(build_model('resnet18', 128))
    state = {f'module.encoder_q.{k}': v for k, v in backbone_state_dict(source).items()}
    state.update({'module.encoder_q.fc.0.weight': torch.randn(512, 512), 'module.encoder_q.fc.0.bias': torch.randn(512),
                  'module.encoder_q.fc.2.weight': torch.randn(128, 512), 'module.encoder_q.fc.2.bias': torch.randn(128),
                  'module.queue': torch.randn(128, 65536), 'module.queue_ptr': torch.zeros(1, dtype=torch.long)})
    state.update({f'module.encoder_k.{k}': torch.zeros_like(v) for k, v in backbone_state_dict(source).items()})
    path = tmp_path / 'checkpoint_0199.pth.tar'
    torch.save({'epoch': 200, 'arch': 'resnet18', 'state_dict': state,
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.03, 'params': [0, 1]}]}}, path)
    model = build_model('resnet18', 10)
    before = fresh_copy(model)
    report = load_pretrained(model, path)
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(backbone_state_dict(model))
    assert_backbone_loaded(model, source, before)


def test_load_torchvision_state_dict_and_prefixes(tmp_path):
    source = randomize(build_model('resnet50', 1000))
    for name, state in [('tv.pth', source.state_dict()),
                        ('ddp.pth', {f'module.{k}': v for k, v in source.state_dict().items()}),
                        ('compiled.pth', {f'module._orig_mod.{k}': v for k, v in source.state_dict().items()})]:
        torch.save(state, tmp_path / name)
        model = build_model('resnet50', 10)   # another head size: fc is dropped, never loaded
        before = fresh_copy(model)
        report = load_pretrained(model, tmp_path / name)
        assert report.missing == [] and report.unexpected == [] and report.loaded == 318
        assert_backbone_loaded(model, source, before)


def test_load_old_checkpoint_without_num_batches_tracked(tmp_path):
    source = randomize(build_model('resnet10', 1000))
    torch.save({k: v for k, v in source.state_dict().items() if 'num_batches_tracked' not in k}, tmp_path / 'old.pth')
    report = load_pretrained(build_model('resnet10', 5), tmp_path / 'old.pth')
    assert report.missing == [] and report.unexpected == []


def test_fasttrain_backbone_file_and_safetensors(tmp_path):
    source = randomize(build_model('resnet32', 10, in_channels=1, width=2, head='cosine'))
    save_backbone(source, tmp_path / 'backbone.pt')
    saved = torch.load(tmp_path / 'backbone.pt', weights_only=True)
    assert saved['arch'] == 'resnet32' and not any(k.startswith('fc.') for k in saved['state_dict'])
    save_file(source.state_dict(), str(tmp_path / 'model.safetensors'))
    for name in ('backbone.pt', 'model.safetensors'):
        model = build_model('resnet32', 3, in_channels=1, width=2)
        before = fresh_copy(model)
        report = load_pretrained(model, tmp_path / name)
        assert report.missing == [] and report.unexpected == []
        assert_backbone_loaded(model, source, before)


def test_missing_backbone_tensors_raise_and_extra_ones_are_reported(tmp_path):
    torch.save(build_model('resnet10', 1000).state_dict(), tmp_path / 'r10.pth')
    with pytest.raises(PretrainedMismatch, match=r'r10\.pth: has no weights for .* resnet18.*layer1\.1\.'):
        load_pretrained(build_model('resnet18', 10), tmp_path / 'r10.pth')
    torch.save(build_model('resnet18', 1000).state_dict(), tmp_path / 'r18.pth')
    report = load_pretrained(build_model('resnet10', 10), tmp_path / 'r18.pth')
    assert 'layer4.1.bn2.weight' in report.unexpected and report.missing == []


def test_shape_mismatch_raises(tmp_path):
    path = tmp_path / 'r18.pth'
    torch.save(build_model('resnet18', 1000).state_dict(), path)
    with pytest.raises(PretrainedMismatch, match=r'r18\.pth.*resnet50.*layer1\.0\.conv1\.weight: file \(64, 64, 3, 3\)'):
        load_pretrained(build_model('resnet50', 10), path)
    with pytest.raises(PretrainedMismatch, match=r'conv1\.weight: file \(64, 3, 7, 7\) vs model \(64, 1, 7, 7\)'):
        load_pretrained(build_model('resnet18', 10, in_channels=1), path)
    save_backbone(build_model('resnet32', 10), tmp_path / 'w1.pt')
    with pytest.raises(PretrainedMismatch, match='width'):
        load_pretrained(build_model('resnet32', 10, width=2), tmp_path / 'w1.pt')


def test_wrong_recorded_arch_raises(tmp_path):
    save_backbone(build_model('resnet18', 10), tmp_path / 'backbone.pt')
    with pytest.raises(PretrainedMismatch, match=r'backbone\.pt.*resnet18.*expected resnet10'):
        load_pretrained(build_model('resnet10', 10), tmp_path / 'backbone.pt')


def test_nothing_matches_raises(tmp_path):
    torch.save({'encoder.0.weight': torch.zeros(3), 'fc.weight': torch.zeros(10, 64)}, tmp_path / 'other.pth')
    with pytest.raises(PretrainedMismatch, match=r'other\.pth: no backbone key matches a resnet32'):
        load_pretrained(build_model('resnet32', 10), tmp_path / 'other.pth')
    torch.save({'state_dict': {'fc.weight': torch.zeros(10, 64)}}, tmp_path / 'head_only.pth')
    with pytest.raises(PretrainedMismatch, match='no backbone key'):
        load_pretrained(build_model('resnet32', 10), tmp_path / 'head_only.pth')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    with pytest.raises(PretrainedMismatch, match='not a state dict'):
        load_pretrained(build_model('resnet32', 10), tmp_path / 'list.pth')


class Opaque:   # pickled object outside torch's weights_only allow-list
    pass


def test_non_weights_only_file_falls_back_with_warning(tmp_path):
    source = randomize(build_model('resnet20', 10))
    torch.save({'args': Opaque(), 'state_dict': source.state_dict()}, tmp_path / 'legacy.pth')
    model = build_model('resnet20', 10)
    before = fresh_copy(model)
    with pytest.warns(UserWarning, match='weights_only'):
        load_pretrained(model, tmp_path / 'legacy.pth')
    assert_backbone_loaded(model, source, before)
