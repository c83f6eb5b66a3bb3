"""The parts :class:`lightning_spectral.SpectralBoundRegularizer` is composed of, one job each.

``config`` (the validated arguments), ``selection`` (which layers), ``state`` (vectors, input
sizes, checkpoints), ``penalty`` (estimate, reduction, the loss), ``constraint`` (projection,
post-step check; with ``anchored``, ``refresh``), ``curvature`` (the recorded curvature bound of
``curvature_beta``, and when it is settled), ``certified`` (the certified-training term),
``monitor`` (what is logged) and ``sharding`` (FSDP2 weights). Each owns its state; the
callback in :mod:`lightning_spectral.callback` holds every hook and delegates to them. It is the
object to use; these modules are its building blocks and the place to look when extending it.
"""
