"""Baselines hsvfast is measured against (written here from the paper's description; no copied code)."""
