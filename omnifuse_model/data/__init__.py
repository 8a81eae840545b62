"""MIMIC-format data layer: episode readers, discretiser, normaliser, listfiles."""
