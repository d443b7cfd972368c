"""What every Triton kernel of the project needs at launch. Needs triton; imported only where a kernel runs."""
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction


def wrapped(kernel):
    """The kernel as torch.compile and export can trace it; as it is under Triton's interpreter (TRITON_INTERPRET=1,
    where it is no JITFunction)."""
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel
