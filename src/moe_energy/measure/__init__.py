"""Measuring: the one window loop, the one timing helper, the typed window and model records.

Submodules are imported directly (``from moe_energy.measure.window import measure``); this package
imports nothing itself, so ``models`` can use the timing helper without pulling in the meters.
"""
