"""`python -m moe_energy` (what torchrun launches)."""

from .cli import main

main()
