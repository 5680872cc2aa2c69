"""Model families, heads, checkpoint loading and the catalog.

Depends on ``infercore.kernels`` only; knows nothing about HTTP, JSON or scheduling.
"""
