"""Norm schemes: one module per family, each citing its paper."""
