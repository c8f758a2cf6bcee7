"""TGC-Net engine: SSE (CLIP ViT + CNN branch), DATE (knowledge-augmented text), VLCM (vision-language calibration)."""
