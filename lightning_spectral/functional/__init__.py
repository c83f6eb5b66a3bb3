"""Pure tensor math of lightning-spectral: matricizations, bounds, estimates, references.

Nothing here imports Lightning.
"""

from .activations import (
    NonSmoothActivationError,
    SmoothSoftplus,
    activation_curvature,
    activation_curvature_slack,
    activation_slope,
    softplus_switch_slack,
)
from .bounds import (
    SUPPORTED_LAYERS,
    fantastic_four,
    layer_bounds,
    layer_spectral_bound,
)
from .certified_losses import (
    gloro_logits,
    gloro_loss,
    gloro_trades_kl,
    gloro_trades_loss,
    lipschitz_margin_loss,
)
from .certify import certified_radius, logit_margins, pairwise_certified_radius
from .compositional import certified_psd, chain_lipschitz_bound
from .crc import crc_certified_radius
from .crc_attack import CurvatureAttack, curvature_attack
from .curvature_radius import curvature_certified_radius, linear_head_pairwise_curvature
from .exact import conv_spectral_norm, operator_matrix
from .matricize import grouped_weight, matricize, row_subsets, spatial_dims
from .norms import gram_iteration_bound, spectral_norm_exact
from .operator_power import operator_norm_estimate, operator_vector
from .power import fantastic_four_estimate, init_singular_vectors, power_iteration_
from .threads import limit_threads

__all__ = [
    "SUPPORTED_LAYERS",
    "fantastic_four",
    "layer_bounds",
    "layer_spectral_bound",
    "certified_radius",
    "logit_margins",
    "pairwise_certified_radius",
    "gloro_logits",
    "gloro_loss",
    "gloro_trades_kl",
    "gloro_trades_loss",
    "lipschitz_margin_loss",
    "operator_norm_estimate",
    "operator_vector",
    "CurvatureAttack",
    "curvature_attack",
    "NonSmoothActivationError",
    "SmoothSoftplus",
    "activation_curvature",
    "activation_slope",
    "activation_curvature_slack",
    "softplus_switch_slack",
    "certified_psd",
    "chain_lipschitz_bound",
    "crc_certified_radius",
    "curvature_certified_radius",
    "linear_head_pairwise_curvature",
    "grouped_weight",
    "matricize",
    "row_subsets",
    "spatial_dims",
    "fantastic_four_estimate",
    "init_singular_vectors",
    "power_iteration_",
    "gram_iteration_bound",
    "spectral_norm_exact",
    "conv_spectral_norm",
    "operator_matrix",
    "limit_threads",
]
