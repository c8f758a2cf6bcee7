"""Synthetic data with known truth: the ultrasound-like phantom family (``phantoms``)."""
