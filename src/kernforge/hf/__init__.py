"""Hugging Face transformers integration: ``kernforge.patch(model)`` (docs/hf.md).

Importing this package does not import transformers; :func:`patch` does, when it is called.
"""

from .architectures import supported_architectures
from .patching import is_patched, patch, unpatch

__all__ = ["is_patched", "patch", "supported_architectures", "unpatch"]
