"""Frozen backbones and the on-disk feature cache: preparation (raw files -> features), the
content-addressed store, its manifest, and the cached site dataset that training reads."""
