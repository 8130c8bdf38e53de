"""Built-in models, and user models by import path.

Every model here is a plain ``nn.Module`` of torch layers (``nn.Linear``, ``nn.Conv2d``): train it as is for
the plain-PyTorch reference, or hand it to :func:`fbalign.convert` for any rule. ``build`` makes one from a
name and options, filling in the input shape and the number of outputs from the data set.

    >>> model = fbalign.models.build("lenet5", input_shape=(1, 32, 32), num_outputs=10)
    >>> model = fbalign.models.build("mypackage.nets:wide_mlp", input_shape=(1, 28, 28), num_outputs=10, width=512)
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ._util import check_options

__all__ = ["MLP", "LeNet5", "ResNet", "ACTIVATIONS", "MODELS", "build", "resolve_factory", "make_activation"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "linear": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _usable_width(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


class MLP(nn.Sequential):
    """Flatten, then ``Linear`` + activation per hidden width, then a ``Linear`` to the outputs.

    Shapes: input ``(N, *input_shape)``, output ``(N, num_outputs)``.

    Args:
        input_shape: shape of one example, e.g. ``(1, 28, 28)`` or ``(30,)``; flattened.
        num_outputs: classes, or target dimensions of a regression task.
        hidden: hidden widths, e.g. ``[1000]`` for Lillicrap's 784-1000-10 net; ``[]`` is a linear model.
        activation: hidden nonlinearity, one of :data:`ACTIVATIONS`.
        output_activation: nonlinearity after the last layer (``'sigmoid'`` for logistic output units);
            None leaves the output linear (logits for cross-entropy).
        bias: whether the Linear layers have biases.
        batchnorm: insert ``BatchNorm1d`` after each hidden Linear, before its activation (Ioffe & Szegedy 2015;
            Liao et al. 2016 found it indispensable for sign-symmetric feedback). The output layer has none.
    """

    def __init__(self, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (256, 256),
                 activation: str = "relu", output_activation: str | None = None, bias: bool = True,
                 batchnorm: bool = False) -> None:
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence) or not all(map(_usable_width, hidden)):
            raise ValueError(f"MLP: hidden={hidden!r} is not usable: give a list of widths >= 1, e.g. [256, 256] "
                             "([] for a linear model)")  # a zero-width layer would train, to chance, silently
        if not _usable_width(num_outputs):
            raise ValueError(f"MLP: num_outputs={num_outputs!r} must be an integer >= 1")
        widths = [math.prod(input_shape), *hidden, num_outputs]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(n_in, n_out, bias=bias))
            if i < len(widths) - 2:
                if batchnorm:
                    layers.append(nn.BatchNorm1d(n_out))
                layers.append(make_activation(activation))
        if output_activation is not None:
            layers.append(make_activation(output_activation))
        super().__init__(*layers)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): conv 6@5×5, pool, conv 16@5×5, pool, conv 120@5×5, fc 84, fc outputs.

    On 32×32 inputs the third convolution sees a 5×5 map (the classic layout, as in BioTorch's benchmarks);
    28×28 inputs are zero-padded by 2 in the first convolution to get there.

    Shapes: input ``(N, C, 32, 32)`` or ``(N, C, 28, 28)``, output ``(N, num_outputs)``.

    Args:
        input_shape: ``(channels, height, width)`` with height = width = 28 or 32.
        num_outputs: classes.
        activation: nonlinearity after every layer but the last, one of :data:`ACTIVATIONS`.
        pool: ``'max'`` or ``'avg'`` subsampling.
        batchnorm: insert ``BatchNorm2d`` after each convolution and ``BatchNorm1d`` after the hidden Linear,
            before the activation. The output layer has none.
        fc_activation: the nonlinearity between the two Linear layers. BioTorch's LeNet has none there (its
            fc1 and fc2 compose to one linear map of rank 84); ``False`` builds that variant, for comparisons
            with BioTorch's published errors.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 32, 32), num_outputs: int = 10, activation: str = "relu",
                 pool: str = "max", batchnorm: bool = False, fc_activation: bool = True) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[1] != input_shape[2] or input_shape[1] not in (28, 32):
            raise ValueError(f"LeNet5 takes images of shape (C, 32, 32) or (C, 28, 28), not {tuple(input_shape)}; "
                             "set data.size = 32 to resize the images")
        if pool not in ("max", "avg"):
            raise ValueError(f"LeNet5: pool={pool!r}; choose 'max' or 'avg'")
        pooling = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        pad = (32 - input_shape[1]) // 2

        def normed(channels: int, norm: type[nn.Module]) -> list[nn.Module]:
            return [norm(channels)] if batchnorm else []

        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 6, 5, padding=pad), *normed(6, nn.BatchNorm2d), make_activation(activation),
            pooling(2),
            nn.Conv2d(6, 16, 5), *normed(16, nn.BatchNorm2d), make_activation(activation), pooling(2),
            nn.Conv2d(16, 120, 5), *normed(120, nn.BatchNorm2d), make_activation(activation),
        )
        hidden_activation = [make_activation(activation)] if fc_activation else []
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(120, 84), *normed(84, nn.BatchNorm1d),
                                        *hidden_activation, nn.Linear(84, num_outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a shortcut (a 1×1 convolution + BatchNorm when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet with BatchNorm for 28×28 or 32×32 images (He et al. 2016's CIFAR family, ResNet-6n+2).

    A 3×3 stem, three stages of ``n`` basic blocks at ``width``, 2·``width`` and 4·``width`` channels (the
    last two halve the resolution), global average pooling and a linear classifier. ``depth=20`` is the
    ResNet-20 of BioTorch's CIFAR-10 table.

    Shapes: input ``(N, C, H, W)``, output ``(N, num_outputs)``.

    Args:
        input_shape: ``(channels, height, width)``.
        num_outputs: classes.
        depth: 6n + 2 layers: 8, 14, 20, 32, 44, 56, ...
        width: channels of the first stage.
    """

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_outputs: int = 10, depth: int = 20,
                 width: int = 16) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ResNet takes images of shape (C, H, W), not {tuple(input_shape)}")
        if not _usable_width(width):
            raise ValueError(f"ResNet: width={width!r} must be an integer >= 1 (the channels of the first stage)")
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet: depth={depth} must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, ...)")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages: list[nn.Module] = []
        channels = width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_outputs))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "lenet5": LeNet5, "resnet": ResNet}


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """The factory for a built-in name (see :data:`MODELS`) or an import path ``'package.module:factory'``."""
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, or give a factory of your own "
                         "as 'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {name!r}: cannot import {module_name!r} ({e}); is it installed or on PYTHONPATH?") \
            from e
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"model {name!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ValueError(f"model {name!r}: {attr!r} is not callable")
    return factory  # type: ignore[return-value]


def build(name: str, *, input_shape: Sequence[int], num_outputs: int, **options: Any) -> nn.Module:
    """Build a model by name (``'mlp'``, ``'lenet5'``, ``'resnet'``) or import path with ``options``.

    ``input_shape`` (one example's shape) and ``num_outputs`` are passed to the factory when it takes
    parameters of those names, so a user factory may take them or not. Unknown options raise ``ValueError``
    naming the valid ones.
    """
    factory = resolve_factory(name)
    automatic = {"input_shape": tuple(input_shape), "num_outputs": num_outputs}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    supplied = [k for k in automatic if k in params]
    check_options(factory, options, f"model {name!r}", supplied)
    model = factory(**{k: automatic[k] for k in supplied}, **options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model
