"""Expression kernels: elementwise and rowwise ops from C-like expressions, with gradients.

```python
import kernforge as kf

silu_mul = kf.elementwise("silu(x) * y")              # Triton, CUDA and torch from one spec
rms = kf.rowwise("x * rsqrt(rowmean(x * x) + eps) * w", params={"eps": 1e-6})
y = rms(x, w)                                          # differentiable; gradients derived
```

Modules: :mod:`.parse` (text -> tree), :mod:`.tree` (nodes, simplification), :mod:`.snippets`
(the function library), :mod:`.diff` (symbolic derivatives), :mod:`.program` (kernel programs
and derived backward programs), :mod:`.evaluate` (torch evaluation: the reference),
:mod:`.layout` (broadcasting and strides), :mod:`.triton` and :mod:`.cuda` (code generation),
:mod:`.spec` and :mod:`.api` (the public ops). See ``docs/expressions.md``.
"""

from .api import ExprOp, elementwise, reference, rowwise
from .diff import derivative
from .parse import ExpressionError, parse

__all__ = ["ExprOp", "ExpressionError", "derivative", "elementwise", "parse", "reference",
           "rowwise"]  # fmt: skip
