"""Pallas kernels (flash attention, decode attention), selected through the config's `attention=` key.

The XLA implementation in tunix_core/models/attention.py is the reference every kernel is tested against.
"""
