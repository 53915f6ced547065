"""Detector SavedModels: the one loader both the runner (tuning) and the exporter use."""
