"""The NumPy front end: trace plain NumPy-style Python functions into the kernforge IR.

- :func:`trace` / :func:`bind`: turn a call into a verified :class:`~kernforge.ir.Graph`.
- :class:`TracedArray`: what the traced function sees in place of each array.
- :mod:`kernforge.frontend.np_api` (``kernforge.np``): the supported functions, usable on
  traced values and on NumPy arrays alike.
- :mod:`kernforge.frontend.dtypes`: dtype names and NumPy 2 promotion (with bfloat16).
"""

from . import dtypes, np_api
from .trace import ArgSpec, Bound, OutTree, Traced, bind, is_array, spec_of, trace, trace_bound
from .values import TracedArray

__all__ = [
    "ArgSpec", "Bound", "OutTree", "Traced", "TracedArray", "bind", "dtypes", "is_array",
    "np_api", "spec_of", "trace", "trace_bound",
]  # fmt: skip
