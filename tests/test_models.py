"""fbalign.models: shapes of the built-in models, user factories by import path, clear option errors."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from fbalign import models


@pytest.mark.parametrize("size", [28, 32])
def test_lenet5_takes_28_and_32_pixel_images(size):
    net = models.build("lenet5", input_shape=(1, size, size), num_outputs=10)
    assert net(torch.zeros(3, 1, size, size)).shape == (3, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [6, 16, 120]
    assert convs[0].padding == ((32 - size) // 2,) * 2


def test_lenet5_rejects_other_sizes_with_advice():
    with pytest.raises(ValueError, match="data.size = 32"):
        models.LeNet5((1, 8, 8), 10)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_resnet_has_batchnorm_and_the_right_depth(shape):
    net = models.build("resnet", input_shape=shape, num_outputs=7, depth=8, width=4)
    assert net(torch.zeros(2, *shape)).shape == (2, 7)
    weighted = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                and not (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]
    assert len(weighted) == 8  # depth counts the 3×3 convolutions and the classifier
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with pytest.raises(ValueError, match="6n"):
        models.ResNet(shape, 10, depth=10)


def test_mlp_widths_and_activations():
    net = models.MLP((1, 4, 4), 3, hidden=[5, 6], activation="tanh", output_activation="sigmoid")
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 5), (5, 6), (6, 3)]
    assert sum(isinstance(m, nn.Tanh) for m in net) == 2 and isinstance(net[-1], nn.Sigmoid)
    assert len([m for m in models.MLP((30,), 10, hidden=[]) if isinstance(m, nn.Linear)]) == 1
    with pytest.raises(ValueError, match="choose one of relu"):
        models.MLP((3,), 2, activation="swishy")


def test_unknown_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="no option 'width'.*hidden, activation"):
        models.build("mlp", input_shape=(3,), num_outputs=2, width=3)
    with pytest.raises(ValueError, match="unknown model 'vgg'.*package.module:function"):
        models.build("vgg", input_shape=(3,), num_outputs=2)


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_outputs, hidden=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))\n"
        "def fixed():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"
        "def not_a_model():\n"
        "    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_nets"
    sys.modules.pop("user_nets", None)


def test_user_factory_by_import_path(user_package):
    net = models.build(f"{user_package}:tiny", input_shape=(1, 8, 8), num_outputs=5, hidden=7)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    # A factory that takes neither input_shape nor num_outputs gets neither.
    assert models.build(f"{user_package}:fixed", input_shape=(1, 8, 8), num_outputs=10)(
        torch.zeros(1, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="no option 'depth'; its options are: hidden"):
        models.build(f"{user_package}:tiny", input_shape=(1, 8, 8), num_outputs=5, depth=3)
    with pytest.raises(ValueError, match="returned a int"):
        models.build(f"{user_package}:not_a_model", input_shape=(1,), num_outputs=1)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        models.resolve_factory(f"{user_package}:nope")
    with pytest.raises(ValueError, match="cannot import 'no_such_package_xyz'"):
        models.resolve_factory("no_such_package_xyz:net")


def test_batchnorm_sits_after_every_hidden_layer_before_its_activation():
    mlp = models.MLP((1, 4, 4), 3, hidden=[5, 6], activation="tanh", batchnorm=True)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "Tanh", "Linear", "BatchNorm1d", "Tanh", "Linear"]
    assert [m.num_features for m in mlp if isinstance(m, nn.BatchNorm1d)] == [5, 6]
    lenet = models.build("lenet5", input_shape=(1, 28, 28), num_outputs=10, batchnorm=True)
    assert [type(m).__name__ for m in lenet.features] == [
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU"]
    assert [type(m).__name__ for m in lenet.classifier] == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert lenet(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_lenet5_without_fc_activation_is_biotorchs_variant_a_rank_84_linear_classifier():
    torch.manual_seed(0)
    net = models.build("lenet5", input_shape=(1, 32, 32), num_outputs=10, fc_activation=False)
    assert [type(m).__name__ for m in net.classifier] == ["Flatten", "Linear", "Linear"]
    fc1, fc2 = net.classifier[1], net.classifier[2]
    h = torch.randn(5, 120)  # the two Linears compose to one affine map
    torch.testing.assert_close(net.classifier(h.view(5, 120, 1, 1)),
                               h @ (fc2.weight @ fc1.weight).T + fc2.weight @ fc1.bias + fc2.bias)
    assert [type(m).__name__ for m in models.LeNet5((1, 32, 32), 10).classifier] == [
        "Flatten", "Linear", "ReLU", "Linear"]


def test_batchnorm_is_off_by_default_and_keeps_the_parameter_names():
    torch.manual_seed(0)
    plain = models.LeNet5((1, 32, 32), 10)
    torch.manual_seed(0)
    explicit = models.LeNet5((1, 32, 32), 10, batchnorm=False)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in plain.modules())
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert list(plain.state_dict())[:2] == ["features.0.weight", "features.0.bias"]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in models.MLP((3,), 2))


def test_batchnorm_passes_through_a_config_and_trains_under_a_sign_rule():
    from fbalign.config import ConfigError, load_config
    from fbalign.train import train

    assert load_config({"model": {"name": "lenet5", "batchnorm": True}}).model.options == {"batchnorm": True}
    with pytest.raises(ConfigError, match="no option 'batch_norm'.*batchnorm"):  # a misspelling names the option
        load_config({"model": {"name": "mlp", "batch_norm": True}})
    result = train({"model": {"name": "mlp", "hidden": [16], "batchnorm": True}, "data": {"name": "digits"},
                    "rule": {"name": "usf", "scale": 1.0}, "epochs": 1, "batch_size": 32, "device": "cpu",
                    "threads": 1, "log": {"progress": False}})
    assert any(isinstance(m, nn.BatchNorm1d) for m in result.model.modules())
    assert result.final["test_error"] < 50
