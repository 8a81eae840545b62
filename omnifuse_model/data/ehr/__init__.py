"""ICU time series in the mimic3-benchmarks layout: listfiles, tolerant episode reading, the
benchmark's discretiser and the (pooled or federated) normaliser."""
