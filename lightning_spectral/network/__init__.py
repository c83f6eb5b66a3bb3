"""A guaranteed upper bound on the l2 Lipschitz constant of a whole network (and of its
Jacobian).

The model is traced with ``torch.fx`` and its graph walked once in topological order. Every
node ``v`` gets a number ``L_v`` with ``||v(x) - v(x')|| <= L_v ||x - x'||`` for all inputs
``x, x'`` of *one sample*:

* the input: 1; constants (parameters, buffers, shapes): 0;
* a map ``h`` applied to ``u``: ``L_v = Lip(h) * L_u`` (composition). Convolutions and linear
  layers, as modules or as ``F.conv*`` / ``F.linear`` / ``@`` with a constant weight, get
  ``Lip(h)`` from the bound engine (:func:`~lightning_spectral.functional.layer_spectral_bound`)
  at the input size the trace reveals;
* a sum ``u + w``: ``L_u + L_w`` (triangle inequality). Since ``L_u``, ``L_w`` bound the two
  summands *as functions of the input*, a residual ``x + g(x)`` gets ``1 + L_g``. An operand
  that broadcasting repeats ``r`` times enters with ``sqrt(r) L``: each of its entries appears
  ``r`` times in the output, so squared differences are counted ``r`` times;
* a concatenation ``[u, w]``: ``sqrt(L_u^2 + L_w^2)`` (the squared norms add);
* any other node ``h(u_1, ..., u_k)`` of several inputs with a rule ``K`` (Lipschitz w.r.t. the
  concatenation of its inputs): ``K * sqrt(sum_i L_{u_i}^2)``.

BatchNorm in eval is the affine map ``x -> s * x + t`` with ``s = gamma / sqrt(var + eps)``;
when it follows a convolution (or linear layer) whose output feeds nothing else it is folded
into that layer's weight and the folded layer is bounded (tighter than ``max |s|`` times the
layer bound); otherwise it contributes ``max |s|``.

Pooling uses the input size: an average pool is the Kronecker product of 1-D averaging
matrices, whose norm is the product of their norms (computed exactly); a max pool is
``sqrt(c)``-Lipschitz where ``c`` is the largest number of windows one input position falls
into (``|max_W x - max_W x'| <= ||(x - x')_W||``, and summing the squares over windows counts
each position at most ``c`` times); it is 1 when windows do not overlap. A global average over
``N`` positions gives ``1 / sqrt(N)``. ``F.pad`` copies entries: ``sqrt`` of the largest number
of copies of one entry; a padding module (``nn.ZeroPad2d``, ``nn.ReflectionPad1d``, ...) is
``F.pad`` in its mode. The sorting activations :class:`~lightning_spectral.GroupSort` and
:class:`~lightning_spectral.MaxMin` are 1-Lipschitz (a permutation on each cone of a finite
cover, continuous across the cones); ``torch.maximum(u, w)`` gets ``sqrt(L_u^2 + L_w^2)``.

What a rule may assume. A module gets a built-in (or registered) rule only when it computes
what the rule's class computes: a subclass that redefines ``forward`` (or another method of
that class) is traced into instead, and its inside bounded operation by operation. An in-place
operation is bounded as its out-of-place counterpart only when nothing else reads the tensor
it overwrites (nor a view of it). An input-dependent integer or boolean tensor (casts,
comparisons, ``argmax``) is refused: a step function has no Lipschitz constant. The graph
runs at two batch sizes; a constant whose value a rule reads must be the same at both, so a
number taken from the batch size (``h * x.shape[0]``) is refused, while sizes passed on to a
reshape that keeps the batch axis (``x.view(x.size(0), -1)``) are fine. Finally the
traced graph must reproduce the model's output on a random input, and forward hooks must not
change what their module returns.

The same walk bounds the Lipschitz constant of the Jacobian (:func:`network_curvature_bound`):
every node carries ``(L, C)``; linear nodes scale ``C`` as they scale ``L``, a smooth
activation with constants ``(g, h)`` gives ``C = h L_u^2 + g C_u``, sums add, concatenations
take the root sum of squares; non-smooth nodes (ReLU, max pooling, ...) are refused.

Anything without a rule raises :class:`UnsupportedOperationError` naming it; register rules for
your own module types with :func:`register_lipschitz_rule`. Floating-point rounding of the
float64 products themselves is not accounted for (relative error ~1e-15 per layer). The bound
is of the network in exact arithmetic: a forward that computes in float16 / bfloat16 (a cast
inside it, half-precision weights) warns, naming the node, that its rounding is not covered.
A ``torch.compile``d model or submodule is bounded as the module it wraps (``_orig_mod``).

Layout: :mod:`.tracing` (the trace), :mod:`.walk` (the walker), :mod:`.rules` (one module
per op family, each with its Lipschitz and curvature rules side by side), :mod:`.tape`
(record a walk once, replay it on per-layer norms); the entry points in :mod:`.api`,
:mod:`.curvature`, :mod:`.pairwise`, :mod:`.compositional`.
"""


from .api import network_lipschitz_bound
from .common import LipschitzRule, NonSmoothOperationError, UnsupportedOperationError
from .compositional import compositional_lipschitz_bound, sequential_chain_bound
from .curvature import (
    CurvatureBounds,
    network_curvature_bound,
    network_curvature_bounds,
    network_pairwise_curvature,
)
from .ownership import (
    CurvatureRule,
    register_curvature_rule,
    register_lipschitz_rule,
    unregister_curvature_rule,
    unregister_lipschitz_rule,
)
from .pairwise import lipschitz_and_pairwise, network_pairwise_lipschitz
from .tape import CurvatureTape, LipschitzProgram, record_curvature, record_lipschitz

__all__ = [
    "CurvatureBounds",
    "CurvatureRule",
    "CurvatureTape",
    "LipschitzProgram",
    "LipschitzRule",
    "NonSmoothOperationError",
    "UnsupportedOperationError",
    "compositional_lipschitz_bound",
    "network_curvature_bound",
    "network_curvature_bounds",
    "lipschitz_and_pairwise",
    "network_lipschitz_bound",
    "network_pairwise_lipschitz",
    "network_pairwise_curvature",
    "record_curvature",
    "record_lipschitz",
    "register_curvature_rule",
    "register_lipschitz_rule",
    "sequential_chain_bound",
    "unregister_curvature_rule",
    "unregister_lipschitz_rule",
]
