"""Power caps, carbon and cost: setting, reading back and restoring GPU and CPU power limits (``limits``), a run
or sweep point under each cap (``capped``), and the g CO2e and cost per million built on the user's grid
intensity and price (``carbon``: labelled estimates). Submodules are imported directly."""
