"""Models: one catalogue (embedded, registry, cache, imported, path -> spec), the store (registry, cache, verified
downloads and imports), specs and safe weight loading.

Importable without torch, safetensors or jsonschema (the Slicer panel lists the models before they are installed).
"""

from .catalogue import list_models, load_spec, resolve_spec_path
from .spec import DEFAULT_MODEL, ENGINE_SPEC_KEYS, MODELS_DIR, check_spec, read_spec
from .weights import load_checkpoint, load_weights, sha256_file, verify_file, write_spec

__all__ = ["DEFAULT_MODEL", "ENGINE_SPEC_KEYS", "MODELS_DIR", "check_spec", "list_models", "load_checkpoint",
           "load_spec", "load_weights", "read_spec", "resolve_spec_path", "sha256_file", "verify_file", "write_spec"]
