r"""Losses that train for a Lipschitz certificate: GloRo, its TRADES form, Lipschitz margin.

All three take the logits ``z = f(x)`` of a batch, the labels ``y`` and the margin Lipschitz
bounds ``K`` of the network: ``K[y, j]`` bounds the Lipschitz constant of ``z_y - z_j``, so
``z_y - z_j > eps * K[y, j]`` for every ``j != y`` certifies the prediction within
``||delta||_2 <= eps``. With a linear head ``z = W g + b`` one can take
``K[y, j] = ||W_y - W_j|| L_g``; without one, ``sqrt(2) L`` for every pair, ``L`` the network's
Lipschitz bound (Tsuzuku, Sato & Sugiyama, NeurIPS 2018).

* :func:`gloro_logits` / :func:`gloro_loss` (Leino, Wang & Fredrikson, "Globally-Robust
  Neural Networks", ICML 2021): the "bottom" logit
  ``z_bot = max_{j != y} (z_j + eps * K[y, j])`` is appended to the logits, and the loss is
  cross-entropy over the ``C + 1`` logits ``[z, z_bot]`` with label ``y``. ``z_y`` wins against
  ``z_bot`` exactly when the certificate holds at radius ``eps``, so the loss is small only for
  points certified at ``eps``.
* :func:`gloro_trades_loss` (the TRADES form of GloRo, after Zhang et al., ICML 2019):
  ``CE(z, y) + lam * KL(softmax([z, -inf]) || softmax([z, z_bot]))``: accuracy from the first
  term, agreement of the plain and the "bottom-augmented" predictions from the second.
* :func:`lipschitz_margin_loss` (Tsuzuku et al. 2018): ``CE(t * (z + m * (1 - onehot(y))), y)``
  with a fixed margin ``m`` (``m = eps * max K`` is the certificate's).

``K`` may be a 0-dim tensor (one bound for every pair), or ``(C, C)``; it may carry gradients
(a differentiable estimate during training, so the loss pulls the bound down where it costs
certificates). These are training objectives: certificates must come from guaranteed bounds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gloro_logits", "gloro_loss", "gloro_trades_kl", "gloro_trades_loss", "lipschitz_margin_loss",
]


def _check(logits: Tensor, target: Tensor, eps: float) -> None:
    if logits.ndim != 2 or logits.shape[1] < 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be floating point (N, C) with C >= 2, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    if target.shape != logits.shape[:1] or target.is_floating_point():
        raise ValueError(f"target must be (N,) integer class indices, got "
                         f"{tuple(target.shape)} {target.dtype}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _pairwise_rows(pairwise: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``K[y_n, j]`` for every sample ``n`` and class ``j``: ``(N, C)``."""
    k = torch.as_tensor(pairwise)
    if k.ndim == 0:
        return k.expand(target.shape[0], num_classes)
    if k.shape != (num_classes, num_classes):
        raise ValueError(f"pairwise bounds must be 0-dim or ({num_classes}, {num_classes}), "
                         f"got {tuple(k.shape)}")
    return k[target]


def gloro_logits(logits: Tensor, target: Tensor, eps: float, pairwise: Tensor) -> Tensor:
    """``[z, z_bot]``, ``(N, C + 1)``: the logits and ``max_{j != y} (z_j + eps K[y, j])``.

    The bottom logit is computed in the logits' dtype (float32 at least); ``K`` is cast to it.
    """
    _check(logits, target, eps)
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    k = _pairwise_rows(pairwise, target, z.shape[1]).to(z.dtype)
    raised = z + eps * k
    own = F.one_hot(target.long(), z.shape[1]).bool()
    bottom = raised.masked_fill(own, -math.inf).amax(dim=1, keepdim=True)
    return torch.cat([z, bottom], dim=1)


def gloro_loss(logits: Tensor, target: Tensor, eps: float, pairwise: Tensor) -> Tensor:
    """``CE([z, z_bot], y)``, the GloRo objective (mean over the batch)."""
    return F.cross_entropy(gloro_logits(logits, target, eps, pairwise), target.long())


def gloro_trades_kl(logits: Tensor, target: Tensor, eps: float, pairwise: Tensor) -> Tensor:
    """``KL(p || q)``, ``p = softmax(z)`` (0 on the bottom class), ``q = softmax([z, z_bot])``:
    the certificate term of :func:`gloro_trades_loss` (mean over the batch, >= 0)."""
    augmented = gloro_logits(logits, target, eps, pairwise)
    log_p = F.log_softmax(augmented[:, :-1], dim=1)
    log_q = F.log_softmax(augmented, dim=1)[:, :-1]
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def gloro_trades_loss(logits: Tensor, target: Tensor, eps: float, pairwise: Tensor,
                      lam: float = 1.0) -> Tensor:
    """``CE(z, y) + lam * KL(p || q)`` (see :func:`gloro_trades_kl`); means over the batch."""
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    kl = gloro_trades_kl(logits, target, eps, pairwise)
    return F.cross_entropy(logits, target.long()) + lam * kl


def lipschitz_margin_loss(
    logits: Tensor, target: Tensor, margin: float, temperature: float = 1.0
) -> Tensor:
    """``CE(temperature * (logits + margin * (1 - onehot(target))), target)`` (Tsuzuku et al.).

    Zero only in the limit where the true logit leads every other one by more than ``margin``;
    with ``margin = 0`` and ``temperature = 1`` it is plain cross-entropy.
    """
    wrong = 1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(temperature * (logits + margin * wrong), target)
