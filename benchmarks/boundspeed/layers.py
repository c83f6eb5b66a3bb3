"""The layers measured: ResNet-18's convolutions and a small CNN trained on the digits."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from benchmarks.boundspeed.config import QUICK_LAYERS, Config, Layer


def _input_sizes(model: nn.Module, x: Tensor) -> dict[str, tuple[int, int]]:
    """The spatial input size every Conv2d of ``model`` sees when ``model(x)`` runs."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:]))
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes


def _conv_layers(model: nn.Module, x: Tensor) -> list[Layer]:
    sizes = _input_sizes(model, x)
    return [
        Layer(name, m, sizes[name], represents=[name])
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]


def circular_standin(conv: nn.Conv2d) -> nn.Conv2d:
    """The circular, stride-1, undilated convolution with ``conv``'s filter ("same" size)."""
    k = conv.kernel_size
    standin = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        k,
        padding=(k[0] // 2, k[1] // 2),
        padding_mode="circular",
        groups=conv.groups,
        bias=False,
    ).to(conv.weight.device)
    with torch.no_grad():
        standin.weight.copy_(conv.weight)
    return standin


def resnet18_layers(cfg: Config) -> list[Layer]:
    """Every Conv2d of a seeded random-init ResNet-18 with the input size it sees."""
    from torchvision.models import resnet18

    torch.manual_seed(cfg.seed)
    model = resnet18(weights=None).eval().to(cfg.device)
    size = cfg.image_size
    return _conv_layers(model, torch.zeros(1, 3, size, size, device=cfg.device))


def chosen_layers(layers: list[Layer], cfg: Config) -> list[Layer]:
    """The layers tables 1 and 2 measure: all of them, or one of each kind for --quick."""
    return [layer for layer in layers if layer.name in QUICK_LAYERS] if cfg.quick else layers


def representatives(layers: list[Layer], key: Callable[[Layer], tuple]) -> list[Layer]:
    """One layer per ``key`` (the first), standing for all layers with that key.

    Random-init layers of equal shape, stride and input size are draws from one distribution;
    the totals count each representative's time once per layer it stands for.
    """
    groups: dict[tuple, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(key(layer), []).append(layer)
    return [
        Layer(ms[0].name, ms[0].module, ms[0].input_size, represents=[m.name for m in ms])
        for ms in groups.values()
    ]


def _accuracy(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def trained_digits_cnn(cfg: Config) -> tuple[list[Layer], float]:
    """The convolutions of SmallCNN trained on the digits with plain SGD (seeded), with the
    input sizes they see, and the model's test accuracy."""
    # The only place the library's demo model and data are imported.
    from lightning_spectral.demos import DigitsDataModule, SmallCNN

    torch.manual_seed(cfg.seed)
    data = DigitsDataModule(batch_size=32, seed=cfg.seed)
    data.setup()
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(cfg.digits_epochs):
        for x, y in data.train_dataloader():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    acc = _accuracy(model.eval(), data.test_dataloader())
    model.to(cfg.device)
    return _conv_layers(model, torch.zeros(1, 1, 8, 8, device=cfg.device)), acc
