"""The catalog's kernel families. Importing this package registers every implementation."""

from . import glu, layer_norm, rms_norm, rope, softmax  # noqa: F401
