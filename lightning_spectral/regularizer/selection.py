"""Which layers the regularizer acts on.

A layer is selected when its name (as ``named_modules`` spells it) matches an ``include``
glob and no ``exclude`` glob, it is one of
:data:`~lightning_spectral.functional.bounds.SUPPORTED_LAYERS`, its weight is trainable
(unless ``include_frozen``), and its class runs the torch class's own ``forward``. The last
condition is a correctness one: the bounds are bounds of ``W x`` with the stored weight, and a
subclass overriding ``forward`` (weight standardization, a gain) need not compute that map, so
no bound of its weight bounds it.

Names are those of the uncompiled model: ``torch.compile(net)`` wraps ``net`` in an
``OptimizedModule`` that holds it as ``_orig_mod``, and those segments are dropped
(:func:`canonical_name`), so ``net.0`` names the same layer with or without compilation, in
patterns, logged keys and checkpoints alike. A pattern spelled with ``_orig_mod`` matches too.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, cast

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..functional.bounds import SUPPORTED_LAYERS
from ..functional.modules import behaves_as

__all__ = [
    "DEFAULT_INCLUDE", "canonical_name", "computes_w_x", "layer_weight", "non_default_selection",
    "select_layers",
]

DEFAULT_INCLUDE = ("*",)

_COMPILE_WRAPPER = "_orig_mod"  # the attribute under which torch.compile's wrapper holds a module


def canonical_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` segments of ``torch.compile`` wrappers."""
    return ".".join(part for part in name.split(".") if part != _COMPILE_WRAPPER)


def _torch_base(module: nn.Module) -> type:
    return next(c for c in type(module).__mro__ if c in SUPPORTED_LAYERS)


def computes_w_x(module: nn.Module) -> bool:
    """Whether the layer behaves as its torch class
    (:func:`~lightning_spectral.functional.modules.behaves_as`: its own ``forward`` and
    ``_conv_forward``, nothing redefined on the way).

    Only then is its output the convolution (or matrix product) with ``module.weight`` that
    the bounds are bounds of; a subclass that rescales or standardizes its weight is not.
    """
    return behaves_as(module, _torch_base(module))


def _matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    # The canonical name, or the name as named_modules spells it (with "_orig_mod").
    names = {name, canonical_name(name)}
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


@dataclass
class _Selection:
    """The chosen layers, and what was left out (for the warnings)."""

    chosen: dict[str, nn.Module] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)
    overriding: list[str] = field(default_factory=list)
    frozen: int = 0

    def add(self, name: str, module: nn.Module, include_frozen: bool) -> None:
        if not (include_frozen or layer_weight(module).requires_grad):
            self.frozen += 1
        elif not computes_w_x(module):
            self.overriding.append(f"{name} ({type(module).__name__})")
        else:
            self.chosen[name] = module


def layer_weight(module: nn.Module) -> Tensor:
    """The weight of a selected layer (every supported layer has one), typed as a tensor: a
    module's attributes read as ``Tensor | Module`` to a type checker."""
    return cast(Tensor, module.weight)


def _has_matrix_weight(module: nn.Module) -> bool:
    # A leaf with a weight of two or more dimensions: a layer the user may have meant to
    # include, which gets a warning when an explicit pattern matches it.
    w = getattr(module, "weight", None)
    leaf = not any(True for _ in module.children())
    return leaf and isinstance(w, Tensor) and w.ndim >= 2


def select_layers(
    root: nn.Module,
    include: list[str] | None,
    exclude: list[str] | None,
    include_frozen: bool,
) -> dict[str, nn.Module]:
    """The selected layers of ``root`` by name, in model order; warns about what is left out.

    ``include=None`` means every layer (and no warning about unsupported types).
    """
    patterns = include if include is not None else DEFAULT_INCLUDE
    found = _Selection()
    for name, module in root.named_modules():
        if not name or not _matches(name, patterns) or _matches(name, exclude or []):
            continue
        supported = isinstance(module, SUPPORTED_LAYERS)  # not a narrowing: module stays one
        if supported:
            found.add(canonical_name(name), module, include_frozen)
        elif include is not None and _has_matrix_weight(module):
            found.unsupported.append(f"{canonical_name(name)} ({type(module).__name__})")
    _warn_left_out(found)
    if not found.chosen:
        _warn_no_match(root, patterns, exclude or [], found.frozen)
    return found.chosen


def _supported_names() -> str:
    return ", ".join(t.__name__ for t in SUPPORTED_LAYERS)


def _warn_left_out(found: _Selection) -> None:
    if found.unsupported:
        rank_zero_warn(
            "SpectralBoundRegularizer: include patterns match layers of unsupported types, "
            f"which are left out: {', '.join(found.unsupported)}. Supported: "
            + _supported_names()
        )
    if found.overriding:
        rank_zero_warn(
            "SpectralBoundRegularizer: left out layer(s) whose class overrides forward (or "
            f"_conv_forward) of its torch class: {', '.join(found.overriding)}. Such a layer "
            "need not compute W x with its stored weight (e.g. it standardizes or rescales it), "
            "so no bound of that weight is a bound on the layer: it is neither penalized, "
            "constrained nor reported."
        )


def _warn_no_match(
    root: nn.Module, include: list[str] | tuple[str, ...], exclude: list[str], frozen: int
) -> None:
    # Lists the layers that do exist, so that the patterns can be fixed.
    existing = [
        f"{canonical_name(n)} ({type(m).__name__})"
        for n, m in root.named_modules() if n and isinstance(m, SUPPORTED_LAYERS)
    ]
    found = (
        "the model has none of these types"
        if not existing
        else f"{len(existing)} exist: {', '.join(existing[:5])}"
        + (", ..." if len(existing) > 5 else "")
    )
    frozen_note = (
        f"; {frozen} frozen layer(s) matched but are left out (include_frozen=True selects "
        "them)" if frozen else ""
    )
    rank_zero_warn(
        f"SpectralBoundRegularizer: no layer matches include={list(include)!r} "
        f"exclude={list(exclude)!r} among {_supported_names()} layers ({found}){frozen_note}; "
        "the callback does nothing."
    )


def non_default_selection(include: list[str] | None, exclude: list[str] | None,
                          include_frozen: bool) -> dict[str, Any]:
    """The selection arguments that differ from the default, by name (``{}``: the default).

    They name a callback's checkpoint key, so distinct selections get distinct keys.
    """
    chosen = {
        "include": include if include not in (None, list(DEFAULT_INCLUDE)) else None,
        "exclude": exclude or None,
        "include_frozen": include_frozen or None,
    }
    return {k: v for k, v in chosen.items() if v is not None}
