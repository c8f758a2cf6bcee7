"""Synthetic data with known truth: two ultrasound-like phantom families made by different physical models,
``phantoms`` (family A) and ``scatter_phantoms`` (family B), chosen by name in ``families``."""
