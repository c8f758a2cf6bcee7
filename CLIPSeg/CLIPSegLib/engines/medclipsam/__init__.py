"""MedCLIP-SAM (Koleilat et al., MICCAI 2024; v2 MedIA 2025): BiomedCLIP (``biomedclip``, optionally fine-tuned with
the ``dhn_nce`` loss) gives a text-conditioned ``saliency`` map of a slice; ``prompts`` turns it into boxes and points;
``sam`` segments each box with Segment Anything. Importing this package imports nothing heavy."""
