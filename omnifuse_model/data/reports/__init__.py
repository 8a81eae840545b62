"""MIMIC-CXR free-text radiology reports: where they live and which sections the model reads."""
