"""The one run skeleton and its workloads: prepare a model before its windows (``prepare``), the seed's trained
classifiers (``seed``), an LLM MoE layer (``layer``), and the sweep over a grid of points (``sweep``).
Submodules are imported directly."""
