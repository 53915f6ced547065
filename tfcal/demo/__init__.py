"""The embedded demo: synthetic shapes data, the detector's training script and the detector."""
