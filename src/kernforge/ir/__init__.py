"""The kernforge IR: one small typed graph that every front door produces and every pass takes
(see ``docs/jit.md``)."""

from . import dtypes, ops
from .graph import Graph, Node, Value, VerifyError
from .ops import SPECS, broadcast_shapes

__all__ = ["SPECS", "Graph", "Node", "Value", "VerifyError", "broadcast_shapes", "dtypes", "ops"]
