"""A fixed-vocabulary MONAI UNet engine (MedCLIP-SAM's weakly supervised stage trains it on zero-shot masks)."""
