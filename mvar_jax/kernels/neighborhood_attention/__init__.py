"""2D neighbourhood attention (NATTEN semantics): reference ops and a Pallas GPU kernel."""

from mvar_jax.kernels.neighborhood_attention.api import neighborhood_attention, resolve_implementation

__all__ = ['neighborhood_attention', 'resolve_implementation']
