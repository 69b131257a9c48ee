"""Attention layers for Flax NNX and Equinox that compute attention with jax_flash.

The framework is imported by the submodule only, so ``import jax_flash`` needs neither::

    from jax_flash.layers.flax import MultiHeadAttention       # pip install "jax-flash[flax]"
    from jax_flash.layers.equinox import MultiheadAttention    # pip install "jax-flash[equinox]"
"""
