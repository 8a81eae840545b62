"""MIMIC-format data layer, by what it holds.

- ``ehr/``: mimic3-benchmarks listfiles, tolerant episode reading, discretiser, normaliser
- ``cxr/``: MIMIC-CXR-JPG metadata, stay <-> image linking, image loading
- ``reports/``: radiology report files and the sections the model reads
- ``features/``: frozen backbones, the feature cache (store, manifest, preparation) and the
  cached site dataset
- ``ingest.py`` / ``ingest_report.py``: a site's files -> one record per listed stay, with
  every repair and rejection counted and named
"""
