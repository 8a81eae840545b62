"""Chest X-rays in the MIMIC-CXR-JPG layout: metadata, stay <-> image linking, image loading."""
