"""`python -m moe_energy` (what torchrun launches).

Guarded: a process started by ``spawn`` (vLLM's engine core, once CUDA is initialised here) imports this module
again as ``__mp_main__``, and must not run the command a second time."""

from .cli import main

if __name__ == "__main__":
    main()
