"""Stage 1, core: configs, parameter paths, kernel layouts, target selection; no arrays are adapted here."""
