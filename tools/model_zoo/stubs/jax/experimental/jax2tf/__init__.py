"""Stub: tensorflowjs.converters.jax_conversion imports it; tfjs graph models never use it."""
