"""The selected layers, their persistent power-iteration vectors and their input sizes.

Layers whose grouped filters share a shape (and device and compute dtype) form one
:class:`ShapeGroup`, whose vectors are stacked so that one batched iteration serves them all.
The vectors are buffers of small ``nn.Module`` s (as torch's ``spectral_norm`` keeps ``u``,
``v``), so a device move is ``.to()``. The checkpoint format is per layer name, independent
of the grouping: ``{"version": 1, "layers": {name: {"u": [...], "v": [...]}},
"input_sizes": {name: size}}``.
"""

from __future__ import annotations

import zlib
from typing import Any, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ..functional.matricize import grouped_weight
from ..functional.power import (
    compute_dtype,
    concatenated_state,
    fantastic_four_estimate_cat,
    init_singular_vectors,
    power_iteration_,
    state_views,
)
from .selection import layer_weight
from .sharding import full_weight

__all__ = ["LayerState", "ShapeGroup"]


def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def _grouped_shape(module: nn.Module) -> tuple[int, ...]:
    w, g = layer_weight(module), _groups(module)
    return (g, w.shape[0] // g, *w.shape[1:])


def _layer_seed(name: str) -> int:
    # A deterministic function of the name alone: every DDP rank (and a resumed run) draws the
    # same starting vectors without communicating. crc32, unlike hash(), is not salted.
    return zlib.crc32(name.encode("utf-8"))


def _group_key(module: nn.Module) -> tuple[Any, ...]:
    w = layer_weight(module)
    return (_grouped_shape(module), w.device, compute_dtype(w.dtype))


class ShapeGroup(nn.Module):
    """Layers whose grouped filters share one shape, with their stacked vectors as buffers."""

    u_cat: Tensor  # buffers (registered in __init__)
    v_cat: Tensor

    def __init__(self, names: list[str], modules: list[nn.Module]) -> None:
        super().__init__()
        self.names = names
        self.layers = modules  # a plain list: the model owns them, not this state
        self.groups = _groups(modules[0])
        w = layer_weight(modules[0])
        self.dtype = compute_dtype(w.dtype)
        per_layer = [
            init_singular_vectors(
                _grouped_shape(m), seed=_layer_seed(n), device=w.device, dtype=self.dtype
            )
            for n, m in zip(names, modules, strict=True)
        ]
        self.n_u, self.n_v = len(per_layer[0][0]), len(per_layer[0][1])
        self.shape = (len(modules), *_grouped_shape(modules[0]))
        u_cat, v_cat = concatenated_state(
            self.shape,
            [torch.stack([p[0][i] for p in per_layer]) for i in range(self.n_u)],
            [torch.stack([p[1][i] for p in per_layer]) for i in range(self.n_v)],
        )
        # One buffer per side in the layout the iteration works in (no concatenation or
        # copies per step); the per-matricization vectors are views of it.
        self.register_buffer("u_cat", u_cat)
        self.register_buffer("v_cat", v_cat)

    @property
    def us(self) -> list[Tensor]:
        """The left vectors, one ``(L, ...)`` stack per matricization (views of the state)."""
        return state_views(self.shape, self.u_cat, self.v_cat)[0]

    @property
    def vs(self) -> list[Tensor]:
        return state_views(self.shape, self.u_cat, self.v_cat)[1]

    def estimate(self, n_iter: int) -> Tensor:
        """The Fantastic-Four estimates of the layers, ``(L,)``, after ``n_iter`` iterations
        (:func:`~lightning_spectral.functional.power.fantastic_four_estimate_cat`)."""
        return fantastic_four_estimate_cat(self.stacked_weights(), self.u_cat, self.v_cat, n_iter)

    def stacked_weights(self) -> Tensor:
        """``(L, g, c_out, c_in, *k)`` in the compute dtype; differentiable w.r.t. each weight.

        A sharded weight is gathered whole first (see :mod:`.sharding`): never a shard.
        """
        ws = [full_weight(layer_weight(m)) for m in self.layers]
        if ws[0].dtype != self.dtype:
            ws = [w.to(self.dtype) for w in ws]
        ws = [grouped_weight(w, self.groups) for w in ws]
        # One layer: a view, no copy. Several: one copy, the price of a single batched iteration.
        return ws[0].unsqueeze(0) if len(ws) == 1 else torch.stack(ws)

    def holds(self, layers: dict[str, nn.Module]) -> bool:
        return all(layers.get(n) is m for n, m in zip(self.names, self.layers, strict=True))

    def vectors(self, i: int) -> list[Tensor]:
        """Layer ``i``'s vectors, ``u`` s then ``v`` s (views: copying into them updates it)."""
        return [t[i] for t in self.us + self.vs]


def _typed(groups: nn.ModuleList) -> list[ShapeGroup]:
    # nn.ModuleList iterates as nn.Module to a type checker; it holds ShapeGroups only.
    return [cast(ShapeGroup, g) for g in groups]


def _build_groups(layers: dict[str, nn.Module], warmup: int) -> nn.ModuleList:
    by_key: dict[tuple[Any, ...], list[str]] = {}
    for name, module in layers.items():
        by_key.setdefault(_group_key(module), []).append(name)
    groups = nn.ModuleList(
        ShapeGroup(names, [layers[n] for n in names]) for names in by_key.values()
    )
    if warmup:
        with torch.no_grad():
            for g in _typed(groups):
                power_iteration_(g.stacked_weights(), g.us, g.vs, warmup)
    return groups


class LayerState:
    """The selected layers and their vectors, built once the layers have weights.

    Lazy layers have no weight shape until a forward pass materializes them: the groups wait
    for that (:meth:`build_if_materialized`). A state loaded before the groups exist (Lightning
    restores callbacks before ``on_fit_start``) is kept and applied when they are built.
    """

    def __init__(self) -> None:
        self.layers: dict[str, nn.Module] = {}
        self.groups = nn.ModuleList()
        self.order: Tensor | None = None  # shape-grouped concatenation -> model order
        self.lazy_pending = False
        self.pending: dict[str, Any] | None = None
        self.input_sizes: dict[str, tuple[int, ...] | None] = {}
        self._size_hooks: list[Any] = []

    @property
    def shape_groups(self) -> list[ShapeGroup]:
        """The groups (those of :attr:`groups`), typed."""
        return _typed(self.groups)

    @property
    def ready(self) -> bool:
        """Whether the vectors exist (some layer is selected, none is lazy)."""
        return len(self.groups) > 0

    def attach(self, layers: dict[str, nn.Module], warmup: int) -> None:
        """Take ``layers`` as the selection; build their vectors unless some are lazy."""
        self.layers = layers
        self.lazy_pending = any(is_lazy(layer_weight(m)) for m in layers.values())
        if not self.lazy_pending:
            self._build(warmup)

    def build_if_materialized(self, warmup: int, *, after_batch: bool = False) -> bool:
        """Build the groups once no selected layer is lazy; whether they exist.

        ``after_batch``: a whole batch has run, so a layer still lazy is one the model does not
        call; it leaves the selection (with a warning) instead of holding up the others.
        """
        if not self.lazy_pending:
            return True
        lazy = [n for n, m in self.layers.items() if is_lazy(layer_weight(m))]
        if lazy and after_batch:
            rank_zero_warn(
                f"SpectralBoundRegularizer: lazy layer(s) {', '.join(lazy)} were not "
                "materialized by a whole batch (never called?) and are left out."
            )
            self.layers = {n: m for n, m in self.layers.items() if n not in lazy}
            lazy = []
        if not lazy:
            self.lazy_pending = False
            self._build(warmup)
        return not self.lazy_pending

    def _build(self, warmup: int) -> None:
        grouped = [n for g in self.shape_groups for n in g.names]
        keep = sorted(grouped) == sorted(self.layers) and all(
            g.holds(self.layers) for g in self.shape_groups
        )
        if keep:  # a second fit() on the same model continues with the vectors it has
            for g in self.shape_groups:
                g.to(layer_weight(g.layers[0]).device)
        else:
            self.groups = _build_groups(self.layers, warmup)
            grouped = [n for g in self.shape_groups for n in g.names]
        if self.ready:
            index = {n: i for i, n in enumerate(grouped)}
            device = self.shape_groups[0].u_cat.device
            self.order = torch.tensor([index[n] for n in self.layers], device=device)
        if self.pending is not None and self.ready:
            self._apply(self.pending)
            self.pending = None

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Per-layer vectors (keyed by layer name) and recorded input sizes."""
        if not self.ready and self.pending is not None:
            return self.pending
        layers = {}
        for g in self.shape_groups:
            for i, name in enumerate(g.names):
                layers[name] = {
                    "u": [u[i].detach().clone() for u in g.us],
                    "v": [v[i].detach().clone() for v in g.vs],
                }
        return {"version": 1, "layers": layers, "input_sizes": dict(self.input_sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ready:
            self._apply(state)
        # Kept to apply again when the layers are (re)discovered at the start of fit.
        self.pending = state

    @torch.no_grad()
    def _apply(self, state: dict[str, Any]) -> None:
        saved = state.get("layers", {})
        self.input_sizes.update(
            {k: (None if v is None else tuple(v)) for k, v in state.get("input_sizes", {}).items()}
        )
        missing = []
        for g in self.shape_groups:
            for i, name in enumerate(g.names):
                if name not in saved:
                    missing.append(name)
                    continue
                entry = saved[name]
                _copy_vectors(name, g.vectors(i), list(entry["u"]) + list(entry["v"]))
        extra = sorted(set(saved) - set(self.layers))
        if missing or extra:
            rank_zero_warn(
                "SpectralBoundRegularizer: the saved state does not match the model's layers "
                f"(no saved vectors for {missing}, saved vectors for unknown layers {extra}); "
                "the former start from fresh vectors."
            )

    # ---------------------------------------------------------------- input sizes

    def record_input_sizes(self) -> None:
        """Record, by forward pre-hooks, the spatial input size each layer sees first."""
        self.remove_size_hooks()
        for name, module in self.layers.items():
            if isinstance(module, nn.Linear) or name in self.input_sizes:
                continue

            def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                d = layer_weight(mod).ndim - 2
                if args and isinstance(args[0], Tensor) and name not in self.input_sizes:
                    self.input_sizes[name] = tuple(int(s) for s in args[0].shape[-d:])

            self._size_hooks.append(module.register_forward_pre_hook(hook))

    def remove_size_hooks(self) -> None:
        # After the first batch: layers not called by then keep the size-free bound.
        for handle in self._size_hooks:
            handle.remove()
        self._size_hooks = []


def _copy_vectors(name: str, mine: list[Tensor], theirs: list[Tensor]) -> None:
    if len(theirs) != len(mine):
        raise ValueError(
            f"SpectralBoundRegularizer state for layer {name}: {len(theirs)} vectors, the layer "
            f"needs {len(mine)}"
        )
    for a, b in zip(mine, theirs, strict=True):
        if tuple(b.shape) != tuple(a.shape):
            raise ValueError(
                f"SpectralBoundRegularizer state for layer {name}: vector of shape "
                f"{tuple(b.shape)} does not fit the layer ({tuple(a.shape)})"
            )
        a.copy_(b)
