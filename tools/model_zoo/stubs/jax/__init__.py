"""Stub package: see jax2tf."""
