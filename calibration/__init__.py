"""Profiles (model, GPU, TP, step-time coefficients, KV capacity) and the calibration jobs."""
