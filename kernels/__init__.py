"""Compute kernels used by the model families.

Each kernel lives in its own module beside its plain-torch reference (which is also the CPU path).
Nothing in this package imports the rest of infercore.
"""
