"""Models: one catalogue (embedded, registry, cache, imported, path -> spec), the store (registry, cache, verified
downloads and imports), specs and safe weight loading.

Importable without torch, safetensors or jsonschema (the Slicer panel lists the models before they are installed).
"""

from .catalogue import ModelRef, find, load_parent, load_spec, resolve, segmentation_models
from .spec import DEFAULT_MODEL, ENGINE_SPEC_KEYS, MODELS_DIR, check_spec, lineage, read_spec
from .weights import clip_part, load_checkpoint, load_weights, sha256_file, verify_file, write_spec

__all__ = ["DEFAULT_MODEL", "ENGINE_SPEC_KEYS", "MODELS_DIR", "ModelRef", "check_spec", "clip_part", "find",
           "lineage", "load_checkpoint", "load_parent", "load_spec", "load_weights", "read_spec", "resolve",
           "segmentation_models", "sha256_file", "verify_file", "write_spec"]
