"""Soundness of the network bound on patterns that look like supported layers but are not:
forward-overriding subclasses, in-place updates, step functions, broadcasting, hooks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_spectral.network import (
    UnsupportedOperationError,
    network_lipschitz_bound,
    register_lipschitz_rule,
    unregister_lipschitz_rule,
)


def linear_map_norm(model: nn.Module, shape: tuple[int, ...]) -> float:
    """Exact l2 Lipschitz constant of an affine per-sample map: its Jacobian's norm."""
    x = torch.zeros(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0].flatten(), x)
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))


class GainLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20 * F.linear(x, self.weight, self.bias)


class LoRALinear(nn.Linear):
    """loralib style: the frozen weight plus a low-rank update B A."""

    def __init__(self, n_in: int, n_out: int, rank: int = 2) -> None:
        super().__init__(n_in, n_out)
        self.lora_a = nn.Parameter(torch.randn(rank, n_in))
        self.lora_b = nn.Parameter(torch.randn(n_out, rank) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + x @ self.lora_a.T @ self.lora_b.T


class StdConv2d(nn.Conv2d):
    """timm / BiT: the weight standardized per output channel before the convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DoubleReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * F.relu(x)


class MaskedLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.register_buffer("mask", torch.full((n_out, n_in), 5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def _subclass_nets() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "gain": (nn.Sequential(GainLinear(6, 4)), (6,)),
        "lora": (nn.Sequential(LoRALinear(6, 4)), (6,)),
        "stdconv": (nn.Sequential(StdConv2d(2, 3, 3, padding=1), nn.Flatten()), (2, 4, 4)),
        "double_relu": (nn.Sequential(nn.Linear(5, 5), DoubleReLU()), (5,)),
        "masked": (nn.Sequential(MaskedLinear(6, 4)), (6,)),
    }


@pytest.mark.parametrize("name", ["gain", "lora", "stdconv", "double_relu", "masked"])
def test_forward_overriding_subclasses_are_traced_into(name: str) -> None:
    net, shape = _subclass_nets()[name]
    net = net.double().eval()
    if name == "double_relu":  # ReLU is the identity on positive inputs: make them positive.
        with torch.no_grad():
            net[0].bias.fill_(100.0)
    bound = float(network_lipschitz_bound(net, shape))
    assert bound >= linear_map_norm(net, shape)


def test_user_rule_is_not_inherited_by_a_forward_override() -> None:
    class Scaled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * x

    class Louder(Scaled):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 30 * x

    register_lipschitz_rule(Scaled, lambda module, shapes: 0.5)
    try:
        assert float(network_lipschitz_bound(nn.Sequential(Louder()), (3,))) == 30.0

        class Quiet(Scaled):
            pass

        assert float(network_lipschitz_bound(nn.Sequential(Quiet()), (3,))) == 0.5
    finally:
        unregister_lipschitz_rule(Scaled)


def test_folding_reads_the_effective_weight_of_a_property_subclass() -> None:
    """A subclass whose weight is a property (computed from a raw parameter) keeps its
    parent's forward; folding must use the weight that forward sees, times the BN scale."""

    class PropConv(nn.Conv2d):
        def __init__(self) -> None:
            super().__init__(1, 1, 1, bias=False)
            del self.weight
            self.raw = nn.Parameter(torch.ones(1, 1, 1, 1))

        @property
        def weight(self) -> torch.Tensor:  # type: ignore[override]
            return self.raw * 2

    net = nn.Sequential(PropConv(), nn.BatchNorm2d(1), nn.Flatten()).double().eval()
    with torch.no_grad():
        net[1].weight.fill_(10.0)
        net[1].running_var.fill_(1.0 - net[1].eps)
    assert float(network_lipschitz_bound(net, (1, 2, 2))) >= linear_map_norm(net, (1, 2, 2))


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _inplace_shared(m, x):
    h = m.fc1(x)
    h.mul_(10)
    return m.fc2(h)


def _inplace_view_of_shared(m, x):
    h = m.fc1(x)
    v = h.view(h.size(0), 2, 2)
    v.mul_(10)
    return m.fc2(h)


def _inplace_relu_shared(m, x):
    h = m.fc1(x)
    y = F.relu(h, inplace=True)
    return y + h


def _alias_augmented(m, x):
    h = m.fc1(x)
    g = h
    g += m.fc2(x)  # mutates h as well: traced as an out-of-place add
    return h + g


@pytest.mark.parametrize(
    "fn", [_inplace_shared, _inplace_view_of_shared, _inplace_relu_shared, _alias_augmented]
)
def test_inplace_updates_of_shared_tensors_are_refused(fn) -> None:
    with pytest.raises(UnsupportedOperationError, match="in-place|trace"):
        network_lipschitz_bound(_Fn(fn), (4,))


def test_private_inplace_updates_are_bounded_as_out_of_place() -> None:
    def fn(m, x):
        h = m.fc1(x).mul_(10)
        h = F.relu(h, inplace=True)
        return m.fc2(h.view(h.size(0), -1).add_(x))

    net = _Fn(fn).double().eval()
    bound = float(network_lipschitz_bound(net, (4,)))
    n1 = float(torch.linalg.matrix_norm(net.fc1.weight.detach(), ord=2))
    n2 = float(torch.linalg.matrix_norm(net.fc2.weight.detach(), ord=2))
    assert bound == pytest.approx(n2 * (10 * n1 + 1), rel=1e-9)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda x: x.to(torch.int32).float(), "floating"),
        (lambda x: x.long().float(), "long|floating"),
        (lambda x: x.int().float(), "int|floating"),
        (lambda x: x.bool().float(), "bool|floating"),
        (lambda x: (x > 0).float(), "gt|floating"),
        (lambda x: torch.gt(x, 0).float(), "gt|floating"),
        (lambda x: x.eq(0).float(), "eq|floating"),
        (lambda x: torch.floor(x), "floor"),
        (lambda x: torch.round(x), "round"),
        (lambda x: x.sign(), "sign"),
        (lambda x: x.frac(), "frac"),
        (lambda x: x.argmax(dim=1, keepdim=True).float(), "argmax|floating"),
        (lambda x: x * torch.rand(4), "rand"),
    ],
)
def test_step_functions_are_refused(fn, match: str) -> None:
    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fn(x)

    with pytest.raises(UnsupportedOperationError, match=match):
        network_lipschitz_bound(Net(), (4,))


def test_float_casts_keep_the_bound() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.to(torch.float16).to(torch.float32).double().float())

    net = Net()
    expected = float(torch.linalg.matrix_norm(net.fc.weight.detach().double(), ord=2))
    with pytest.warns(UserWarning, match="node 'to' computes in torch.float16"):
        assert float(network_lipschitz_bound(net, (4,))) >= expected


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x[:, :1] * torch.ones(1, 9),       # x[:, :1] repeated 9 times
        lambda x: x[:, :1] + x.new_zeros(()) + torch.zeros(9),
        lambda x: x + x[:, :1],                      # x[:, 0] enters 1 + 4 times
        lambda x: torch.clamp(x[:, :1], min=torch.zeros(9)),
    ],
)
def test_broadcast_repetition_is_counted(fn) -> None:
    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fn(x)

    net = Net()
    try:
        bound = float(network_lipschitz_bound(net, (4,)))
    except UnsupportedOperationError:
        return
    x = torch.rand(4, dtype=torch.float64) + 1
    jac = torch.autograd.functional.jacobian(lambda v: net(v[None].float())[0].double(), x)
    assert bound >= float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))


def test_celu_with_negative_alpha_is_refused() -> None:
    for net in (nn.CELU(alpha=-1.0), nn.Sequential(nn.Linear(2, 2), nn.CELU(-0.5))):
        with pytest.raises(UnsupportedOperationError, match="alpha"):
            network_lipschitz_bound(net, (2,))


def test_sequential_subclass_with_its_own_forward_is_not_walked_child_by_child() -> None:
    class Doubling(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for m in self:
                x = m(x)
                if x.sum() > -1e9:  # data-dependent: untraceable
                    x = x * 100
            return x

    net = Doubling(nn.Linear(2, 2))
    with pytest.raises(UnsupportedOperationError, match="trace"):
        network_lipschitz_bound(net, (2,))


def test_forward_hooks_that_change_the_output_are_refused() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    handle = net[0].register_forward_hook(lambda m, args, out: out * 50)
    try:
        with pytest.raises(UnsupportedOperationError, match="hook"):
            network_lipschitz_bound(net, (3,))
    finally:
        handle.remove()
    # A hook that only observes is harmless.
    seen = []
    handle = net[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        assert float(network_lipschitz_bound(net, (3,))) > 0 and seen
    finally:
        handle.remove()


def test_hook_on_a_traced_through_module_is_refused_or_bounded() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    net = nn.Sequential(Block()).double()
    handle = net[0].register_forward_hook(lambda m, args, out: out * 50)
    try:
        try:
            bound = float(network_lipschitz_bound(net, (3,)))
        except UnsupportedOperationError as exc:
            assert "hook" in str(exc) or "trace" in str(exc)
            return
        assert bound >= linear_map_norm(net, (3,))
    finally:
        handle.remove()


def test_conv_on_an_unbatched_input_is_refused() -> None:
    """(B, H, W) into a Conv2d with in_channels == B runs as one unbatched (C, H, W) image:
    it mixes the samples."""
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Flatten())
    with pytest.raises(UnsupportedOperationError, match="batch"):
        network_lipschitz_bound(net, (3, 3))


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_functional_pad_and_conv_are_bounded(mode: str) -> None:
    torch.manual_seed(1)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.pad(x, (2, 1, 1, 2), mode=mode)
            h = F.conv2d(h, self.w, None, stride=(2, 1), dilation=(1, 2), padding=1)
            return F.conv_transpose2d(h, self.w, stride=2).flatten(1)

    net = Net().eval()
    shape = (2, 5, 6)
    assert float(network_lipschitz_bound(net, shape)) >= linear_map_norm(net, shape)


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (lambda x, a: x @ a, None),
        (lambda x, a: torch.matmul(a.T, x.unsqueeze(-1)).flatten(1), None),
        (lambda x, a: (x.view(x.size(0), 1, 1, 6) @ a.expand(3, 6, 4)).flatten(1), None),
    ],
)
def test_matmul_with_a_constant(fn, expected) -> None:
    a = torch.randn(6, 4, dtype=torch.float64)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("a", a)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fn(x, self.a)

    net = Net()
    bound = float(network_lipschitz_bound(net, (6,)))
    exact = linear_map_norm(net, (6,))
    assert bound >= exact
    assert bound <= exact * (1 + 1e-9)


def test_matmul_refusals() -> None:
    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ x.transpose(1, 2)

    with pytest.raises(UnsupportedOperationError, match="input-dependent"):
        network_lipschitz_bound(Net(), (3, 3))

    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("a", torch.ones(2, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a @ x  # contracts the batch axis of a (B, n) input

    with pytest.raises(UnsupportedOperationError, match="batch"):
        network_lipschitz_bound(Mix(), (3,))


def test_root_layers_are_bounded_like_leaves() -> None:
    torch.manual_seed(2)
    for layer, shape in [(nn.Linear(5, 3), (5,)),
                         (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5)),
                         (nn.Conv1d(2, 3, 3, stride=2, dilation=2), (2, 9))]:
        layer = layer.double()
        bound = float(network_lipschitz_bound(layer, shape))
        exact = linear_map_norm(layer, shape)
        assert exact <= bound <= exact * 3
        assert math.isfinite(bound)


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, x: m.fc(x.sum(dim=(1, 2))),       # Linear(2, 2) applied across the batch
        lambda m, x: x.reshape(2, -1),              # batch 2 only by coincidence
        lambda m, x: x * torch.ones(2, 1, 1),       # a per-position constant on the batch axis
    ],
)
def test_sample_mixing_is_refused(fn) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fn(self, x)

    with pytest.raises(UnsupportedOperationError, match="batch|samples"):
        network_lipschitz_bound(Net(), (2, 3))


def test_parametrized_layers_stay_leaves() -> None:
    """torch.nn.utils.parametrizations inject a subclass whose weight is a property: forward
    is the parent's, so the layer rule (and folding) applies to the parametrized weight."""
    torch.manual_seed(3)
    conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 3, 3, padding=1))
    net = nn.Sequential(conv, nn.BatchNorm2d(3), nn.Flatten(),
                        nn.utils.parametrizations.orthogonal(nn.Linear(48, 5))).double()
    for _ in range(30):  # power iteration in train mode
        net[0](torch.randn(1, 2, 4, 4, dtype=torch.float64))
    net.eval()
    bound = float(network_lipschitz_bound(net, (2, 4, 4)))
    exact = linear_map_norm(net, (2, 4, 4))
    assert exact <= bound <= exact * 3


def test_a_model_that_overwrites_its_input_is_bounded() -> None:
    net = _Fn(lambda m, x: m.fc2(x.mul_(2))).double()
    bound = float(network_lipschitz_bound(net, (4,)))
    assert bound == pytest.approx(2 * linear_map_norm(nn.Sequential(net.fc2), (4,)), rel=1e-9)


def test_a_nan_bound_is_an_error_not_a_number() -> None:
    """A BatchNorm with a negative running variance (corrupted state) has no finite scale:
    NaN must not travel on as if it were a bound."""
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        net[3].running_var.fill_(-1.0)
    with pytest.raises(ValueError, match="NaN|finite"):
        network_lipschitz_bound(net, (4,))


@pytest.mark.parametrize(
    "net",
    [nn.Softplus(beta=1.0, threshold=0.1), _Fn(lambda m, x: F.softplus(x, 2.0, -1.0))],
    ids=["module", "functional"],
)
def test_softplus_with_a_visible_jump_is_refused(net) -> None:
    """Softplus switches to the identity above ``threshold``; the switch jumps by
    log1p(exp(-threshold)) / beta (0.64 for threshold 0.1): not Lipschitz."""
    x = torch.tensor([[0.1 - 1e-7], [0.1 + 1e-7]], dtype=torch.float64)
    if isinstance(net, nn.Softplus):
        jump = float((net(x)[0] - net(x)[1]).abs())
        assert jump > 0.5  # the step is real
    with pytest.raises(UnsupportedOperationError, match="threshold"):
        network_lipschitz_bound(net, (4,))
    # The default threshold's jump (2e-9) is below float32 resolution: accepted, as documented.
    assert float(network_lipschitz_bound(nn.Softplus(), (4,))) == 1.0


def test_channel_shuffle_with_torch_functions_is_a_permutation() -> None:
    """shufflenet's channel shuffle: reshape, torch.transpose, contiguous, view."""

    class Shuffle(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            x = torch.reshape(x, (b, 2, c // 2, h, w))
            x = torch.transpose(x, 1, 2).contiguous()
            x = torch.permute(torch.unsqueeze(x.view(b, -1, h, w), 2), (0, 1, 3, 4, 2))
            return torch.squeeze(x, -1).flatten(1)

    assert float(network_lipschitz_bound(Shuffle(), (4, 2, 3))) == 1.0
    with pytest.raises(UnsupportedOperationError, match="batch"):
        network_lipschitz_bound(_Fn(lambda m, x: torch.transpose(x, 0, 1)), (4,))


def test_an_instance_level_forward_override_is_not_the_class() -> None:
    lin = nn.Linear(3, 3).double()
    lin.forward = lambda x: 20 * F.linear(x, lin.weight, lin.bias)
    net = nn.Sequential(lin)
    assert float(network_lipschitz_bound(net, (3,))) >= linear_map_norm(net, (3,))


def test_inplace_after_a_cast_like_a_buffer_is_accepted() -> None:
    """``.to(buffer)`` aliases its input, not the buffer: the buffer is not overwritten."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("template", torch.zeros(1, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).to(self.template).mul_(3)

    net = Net().double()
    assert float(network_lipschitz_bound(net, (4,))) == pytest.approx(
        3 * linear_map_norm(nn.Sequential(net.fc), (4,)), rel=1e-9)


def test_out_arguments_are_refused() -> None:
    def fn(m, x):
        h = m.fc1(x)
        torch.mul(h, 10, out=h)
        return m.fc2(h)

    with pytest.raises(UnsupportedOperationError, match="out="):
        network_lipschitz_bound(_Fn(fn), (4,))


class _BatchScaled(nn.Module):
    """A linear layer whose output is scaled by a number read from the batch size."""

    def __init__(self, scale) -> None:
        super().__init__()
        self.fc, self.scale = nn.Linear(4, 3), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.fc(x), x)


def _batch_jacobian_norm(model: nn.Module, batch: int) -> float:
    """Norm of d out[0] / d x[0] at a batch of ``batch`` (the per-sample map there)."""
    x = torch.randn(batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def first(v: torch.Tensor) -> torch.Tensor:
        return model(torch.cat([v[None], x[1:]]))[0]

    jac = torch.autograd.functional.jacobian(first, x[0])
    return float(torch.linalg.matrix_norm(jac, ord=2))


@pytest.mark.parametrize("scale", [
    lambda h, x: h * x.shape[0],
    lambda h, x: h * x.size(0),
    lambda h, x: h / (1.0 / x.size(0)),
    lambda h, x: x.shape[0] * h,
    lambda h, x: torch.mul(h, x.size()[0]),
    lambda h, x: torch.add(h, h, alpha=x.size(0)),
    lambda h, x: h * torch.full((1,), x.shape[0], dtype=h.dtype),
], ids=["shape_mul", "size_mul", "size_div", "shape_rmul", "size_tuple", "alpha", "full"])
def test_a_constant_read_from_the_batch_size_is_refused(scale) -> None:
    """The walk traces at one batch size: a number taken from it (``x.shape[0]``) would be
    read at that batch only, while the model scales by 64 at a batch of 64."""
    torch.manual_seed(0)
    model = _BatchScaled(scale).double()
    assert _batch_jacobian_norm(model, 64) > 10 * _batch_jacobian_norm(model, 2)
    with pytest.raises(UnsupportedOperationError, match="batch size") as info:
        network_lipschitz_bound(model, (4,))
    assert "at node '" in str(info.value)


@pytest.mark.parametrize("flatten", [
    lambda x: x.view(x.size(0), -1),
    lambda x: x.flatten(1),
    lambda x: x.reshape(x.shape[0], -1),
    lambda x: x.view(x.shape[0], x.shape[1], -1).flatten(1),
    lambda x: torch.reshape(x, (x.size(0), -1)),
], ids=["view_size", "flatten", "reshape_shape", "view_two", "torch_reshape"])
def test_reshapes_that_keep_the_batch_axis_still_bound(flatten) -> None:
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    fc = nn.Linear(2 * 4 * 4, 3).double()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = conv, fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(flatten(self.conv(x)))

    reference = nn.Sequential(conv, nn.Flatten(), fc)
    assert float(network_lipschitz_bound(Net(), (1, 4, 4))) == pytest.approx(
        float(network_lipschitz_bound(reference, (1, 4, 4))), rel=1e-12)


@pytest.mark.parametrize(("cast", "dtype"), [
    (lambda h: h.to(torch.bfloat16), "bfloat16"),
    (lambda h: h.half(), "float16"),
    (lambda h: h.bfloat16(), "bfloat16"),
    (lambda h: h.to(dtype=torch.float16), "float16"),
], ids=["to_bf16", "half", "bfloat16", "to_dtype_f16"])
def test_a_low_precision_cast_inside_forward_warns(cast, dtype: str) -> None:
    """The bound is of the exact-arithmetic map (a cast is the identity there); the rounding
    of half-precision operations is not covered, which the walk says."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = fc1, fc2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.tanh(cast(self.fc1(x))).float())

    plain = float(network_lipschitz_bound(nn.Sequential(fc1, nn.Tanh(), fc2), (4,)))
    with pytest.warns(UserWarning, match=f"computes in torch.{dtype}.*rounding"):
        assert float(network_lipschitz_bound(Net(), (4,))) == plain


def test_float32_and_float64_casts_do_not_warn() -> None:
    import warnings

    net = nn.Sequential(nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        network_lipschitz_bound(_Fn(lambda m, x: m.fc1(x.double().float()).double()), (4,))
        network_lipschitz_bound(net, (4,))
