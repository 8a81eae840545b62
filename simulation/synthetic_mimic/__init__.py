"""Synthetic MIMIC-format data written in the real on-disk layouts (simulation and tests only:
the model package reads these files with the same readers as real MIMIC)."""
