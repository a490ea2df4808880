"""moe-energy: measure when a Mixture-of-Experts model really uses less energy per inference than a dense one."""

__version__ = "0.1.0"
