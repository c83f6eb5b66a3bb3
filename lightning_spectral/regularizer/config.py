"""The constructor arguments of ``SpectralBoundRegularizer``, checked once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from torch import Tensor

from .._checks import check_bool, check_int, check_patterns, check_real, check_reals
from ..certify import default_batch_to_input_target
from ..certify.options import CertifyMethod, check_certify_method, check_input_scale

__all__ = [
    "CERTIFIED_LOSSES", "REDUCTIONS", "CertifiedLoss", "Reduction", "RegularizerConfig",
    "inert_options", "option_attributes",
]

Reduction = Literal["sum", "max", "mean"]

REDUCTIONS = ("sum", "max", "mean")

CertifiedLoss = Literal["gloro", "trades", "margin"]

CERTIFIED_LOSSES = ("gloro", "trades", "margin")


def _optional(check: Callable[..., Any], name: str, value: Any, **kwargs: Any) -> Any:
    return None if value is None else check(name, value, **kwargs)


def _check_epsilons(value: Any) -> list[float] | None:
    # A list, as the callback's YAML spells it; a scalar is refused so that a forgotten
    # bracket is not silently read as one radius. A 1-d array or tensor is a list.
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):
        value = value.tolist()
    if value is not None and not isinstance(value, Sequence):
        raise ValueError(f"certify_epsilons must be a list of numbers >= 0, got {value!r}")
    return _optional(check_reals, "certify_epsilons", value, low=0.0, scalar=False)


def _check_shape(value: Any) -> list[int] | None:
    """A per-sample input shape (no batch axis): a non-empty list of positive integers."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError("curvature_input_shape must be a non-empty list of positive integers "
                         f"(the shape of one sample, without the batch axis), got {value!r}")
    return [check_int("curvature_input_shape entries", v, low=1) for v in value]


@dataclass(frozen=True)
class RegularizerConfig:
    """Every option of the callback (see its docstring), validated on construction.

    ``__post_init__`` raises ``ValueError`` naming the argument and the value received, and
    normalizes the values (floats for reals, lists for patterns and epsilons, one number for
    ``input_scale``: a per-channel sequence becomes its minimum, as the tracker uses it).
    """

    beta: float = 0.0
    n_power_iterations: int = 1
    warmup_power_iterations: int = 50
    include: list[str] | None = None
    exclude: list[str] | None = None
    include_frozen: bool = False
    reduction: Reduction = "sum"
    target: float | None = None
    constraint: float | None = None
    constraint_tight_every_n_steps: int | None = None
    log_every_n_steps: int | None = None
    log_per_layer: bool = True
    exact_every_n_epochs: int | None = None
    check_finite: bool = True
    certify_epsilons: list[float] | None = None
    input_scale: float = 1.0
    batch_to_input_target: Callable[[Any], tuple[Tensor, Tensor]] | None = None
    curvature_beta: float = 0.0
    curvature_input_shape: list[int] | None = None
    certify_method: CertifyMethod = "lipschitz"
    certified_eps: float | None = None
    certified_loss: CertifiedLoss = "gloro"
    certified_weight: float = 1.0
    certified_warmup_steps: int = 0
    bound_max_cost: float | None = None
    certify_compositional: bool = False

    def input_target(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of a batch, by ``batch_to_input_target`` (default
        ``default_batch_to_input_target``: ``batch[0], batch[1]`` or the keys of a dict)."""
        return (self.batch_to_input_target or default_batch_to_input_target)(batch)

    def __post_init__(self) -> None:
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)  # frozen: only __post_init__ may normalize

    def _checked(self) -> dict[str, Any]:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'sum', 'max' or 'mean', got {self.reduction!r}")
        if self.batch_to_input_target is not None and not callable(self.batch_to_input_target):
            raise ValueError(
                f"batch_to_input_target must be callable, got {self.batch_to_input_target!r}"
            )
        check_certify_method("certify_method", self.certify_method)
        if self.certify_method != "lipschitz" and self.certify_epsilons is None:
            raise ValueError(f"certify_method={self.certify_method!r} certifies at "
                             "certify_epsilons: pass them (e.g. certify_epsilons=[0.1])")
        if self.certified_loss not in CERTIFIED_LOSSES:
            raise ValueError("certified_loss must be 'gloro', 'trades' or 'margin', got "
                             f"{self.certified_loss!r}")
        return {
            "certified_eps": _optional(check_real, "certified_eps", self.certified_eps,
                                       low=0.0, strict=True),
            "certified_weight": check_real("certified_weight", self.certified_weight, low=0.0),
            "certified_warmup_steps": check_int("certified_warmup_steps",
                                                self.certified_warmup_steps, low=0),
            "beta": check_real("beta", self.beta, low=0.0),
            "curvature_beta": check_real("curvature_beta", self.curvature_beta, low=0.0),
            "curvature_input_shape": _check_shape(self.curvature_input_shape),
            "n_power_iterations": check_int("n_power_iterations", self.n_power_iterations, low=1),
            "warmup_power_iterations": check_int(
                "warmup_power_iterations", self.warmup_power_iterations, low=0
            ),
            "include": check_patterns("include", self.include),
            "exclude": check_patterns("exclude", self.exclude),
            "include_frozen": check_bool("include_frozen", self.include_frozen),
            "target": _optional(check_real, "target", self.target, low=0.0),
            "constraint": _optional(check_real, "constraint", self.constraint, low=0.0,
                                    strict=True),
            "constraint_tight_every_n_steps": _optional(
                check_int, "constraint_tight_every_n_steps", self.constraint_tight_every_n_steps,
                low=1),
            "log_every_n_steps": _optional(check_int, "log_every_n_steps",
                                           self.log_every_n_steps, low=1),
            "log_per_layer": check_bool("log_per_layer", self.log_per_layer),
            "exact_every_n_epochs": _optional(check_int, "exact_every_n_epochs",
                                              self.exact_every_n_epochs, low=1),
            "check_finite": check_bool("check_finite", self.check_finite),
            "certify_epsilons": _check_epsilons(self.certify_epsilons),
            # One number, per-channel stds reduced as the tracker does: what certification
            # and the certified loss divide by.
            "input_scale": check_input_scale(self.input_scale),
            "bound_max_cost": _optional(check_real, "bound_max_cost", self.bound_max_cost,
                                        low=0.0),
            "certify_compositional": check_bool("certify_compositional",
                                                self.certify_compositional),
        }


def inert_options(cfg: RegularizerConfig) -> list[str]:
    """The options set away from their default that do nothing without another one.

    Each entry names the option, its value and the option it needs, for a warning at
    construction: a forgotten ``constraint`` or ``certified_eps`` would otherwise go unnoticed
    through a whole run.
    """
    curvature = cfg.curvature_beta > 0 or (
        cfg.certify_epsilons is not None and cfg.certify_method != "lipschitz")
    needs = [
        ("target", cfg.target is not None, cfg.beta > 0, "beta > 0 (target shapes the penalty)"),
        ("constraint_tight_every_n_steps", cfg.constraint_tight_every_n_steps is not None,
         cfg.constraint is not None, "constraint"),
        ("certified_loss", cfg.certified_loss != "gloro", cfg.certified_eps is not None,
         "certified_eps"),
        ("certified_weight", cfg.certified_weight != 1.0, cfg.certified_eps is not None,
         "certified_eps"),
        ("certified_warmup_steps", cfg.certified_warmup_steps != 0,
         cfg.certified_eps is not None, "certified_eps"),
        ("curvature_input_shape", cfg.curvature_input_shape is not None, curvature,
         "curvature_beta > 0 or certify_method 'curvature'/'both'"),
        ("input_scale", cfg.input_scale != 1.0,
         cfg.certify_epsilons is not None or cfg.certified_eps is not None,
         "certify_epsilons or certified_eps"),
        ("batch_to_input_target", cfg.batch_to_input_target is not None,
         cfg.certify_epsilons is not None or curvature, "certify_epsilons or curvature_beta > 0"),
        ("certify_compositional", cfg.certify_compositional, cfg.certify_epsilons is not None,
         "certify_epsilons"),
    ]
    return [f"{name}={getattr(cfg, name)!r} has no effect without {needed}"
            for name, is_set, enabled, needed in needs if is_set and not enabled]


class _HasConfig(Protocol):
    config: RegularizerConfig


_Cls = TypeVar("_Cls", bound=type)


def _config_property(name: str) -> property:
    def get(self: _HasConfig) -> Any:
        return getattr(self.config, name)

    def set_(self: _HasConfig, value: Any) -> None:
        self.config = dataclasses.replace(self.config, **{name: value})

    return property(get, set_, doc=f"The ``{name}`` option (see :class:`RegularizerConfig`).")


def option_attributes(cls: _Cls) -> _Cls:
    """Class decorator: every option as an attribute of ``cls`` (``callback.beta``, ...).

    The attribute reads ``self.config``; setting it replaces ``config`` by a re-validated copy,
    so a bad value raises there, not steps later inside training.
    """
    for field in dataclasses.fields(RegularizerConfig):
        setattr(cls, field.name, _config_property(field.name))
    return cls
