"""Stub: tensorflowjs imports it at module load; the graph-model conversion never calls it."""
