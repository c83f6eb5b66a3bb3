"""What a module computes: whether it behaves as a class, and eval mode for a while.

A rule, constant or bound written for a class (``nn.Conv2d``, ``nn.GELU``, ...) holds for a
module only when the module computes what that class computes. :func:`behaves_as` is the one
check of that, used by the network bound's rules, the activation tables and the regularizer's
layer selection alike. :func:`evaluating` is the one eval-mode context: every bound here is
of the network in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["behaves_as", "evaluating"]

# Methods a subclass may redefine without changing what the module computes.
_HARMLESS = frozenset({
    "__init__", "__repr__", "extra_repr", "reset_parameters", "_reset_parameters",
    "reset_running_stats", "__setstate__", "__getstate__", "__deepcopy__",
    "_load_from_state_dict", "__init_subclass__", "_check_input_dim",
})
_CALL_NAMES = frozenset({"__call__", "_call_impl", "_wrapped_call_impl"})


def _is_code(value: Any) -> bool:
    return callable(value) or isinstance(value, (property, staticmethod, classmethod))


def behaves_as(module: nn.Module, klass: type) -> bool:
    """Whether ``module`` computes what ``klass`` (one of its classes) computes.

    It does only when its type does not override ``forward`` or the other methods that
    ``klass``'s computation calls: no class between ``type(module)`` and ``klass``, and not
    the instance itself (``module.forward = ...``), redefines a method of ``klass`` or of its
    bases below ``nn.Module`` (``_conv_forward`` of a convolution, ...), nor the call
    machinery (``__call__``). Redefining a method that does not change the map
    (``__init__``, ``extra_repr``, ``reset_parameters``, ...) is allowed. Then a rule, a
    constant or a bound written for ``klass`` applies to ``module``. Hooks are not looked at
    here: the callers that care check them.
    """
    mro = type(module).__mro__
    defined = set(_CALL_NAMES)
    for base in klass.__mro__:
        if base in (nn.Module, object):
            break
        defined.update(name for name, value in vars(base).items() if _is_code(value))
    # An instance attribute (``module.forward = ...``) shadows the class' method too.
    for namespace in (*(vars(sub) for sub in mro[: mro.index(klass)]), vars(module)):
        for name, value in namespace.items():
            if name in defined and name not in _HARMLESS and _is_code(value):
                return False
    return True


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, every submodule's own ``training`` flag restored after.

    The bounds are for the network in eval mode; logits computed in train mode (dropout,
    batch statistics) come from another map, and a train-mode BatchNorm would also update
    its running statistics. The flags are restored as they were, one by one (not through
    ``train()``, which a module may override). Gradients are left alone: callers that need
    none add ``torch.no_grad()``.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
