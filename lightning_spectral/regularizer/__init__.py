"""The parts :class:`lightning_spectral.SpectralBoundRegularizer` is composed of, one job each.

``config`` (the validated arguments), ``selection`` (which layers), ``state`` (vectors, input
sizes, checkpoints), ``penalty`` (estimate, reduction, the loss), ``constraint`` (projection,
post-step check), ``monitor`` (what is logged) and ``curvature`` (the recorded curvature
bound of ``curvature_beta``); the callback's hooks are mixins here, ``training``,
``curvature_hooks``, ``checkpoint`` and ``evaluation``. The callback in
:mod:`lightning_spectral.callback` is the object to use; these modules are its building blocks
and the place to look when extending it.
"""
