"""Running lowered programs: generated kernels on the GPU or under Triton's interpreter
(:mod:`.program`), or the IR evaluated with NumPy (:mod:`.simulate`)."""
