"""The catalog's kernel families. Importing this package registers every implementation."""

from . import glu, layer_norm, linear, rms_norm, rope, softmax  # noqa: F401
