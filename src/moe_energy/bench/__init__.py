"""Benchmarks the tool runs for its users, apart from energy windows: every MoE strategy timed against the dense
baselines (``strategies``), transformers' own MoE blocks holding the same weights (``peers``), and the
five-minute check of a new host (``selfcheck``). Submodules are imported directly."""
