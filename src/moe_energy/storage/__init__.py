"""Where results live: atomic file writes and the UTC stamp (``fileio``), the versioned run JSON (``results``) and
the SQLite store sweeps write and the report reads (``store``). Submodules are imported directly."""
