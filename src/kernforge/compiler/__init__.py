"""The model compiler: a ``torch.nn.Module`` in, a :class:`kernforge.runtime.model.Program` out
(see ``docs/compiler.md``)."""

from ..runtime.model import Program
from .compile import compile_model, optimize
from .importer import import_model, supported_ops

__all__ = ["Program", "compile_model", "import_model", "optimize", "supported_ops"]
