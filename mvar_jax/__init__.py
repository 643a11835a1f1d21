"""mvar-jax: MVAR (scale- and spatial-Markovian visual autoregressive modelling) in JAX/Flax.

Start with `mvar_jax.api` (load weights, encode/decode, logits, sample); the modules are
listed in the README.
"""

__version__ = '0.1.0'
