"""Triton backend of ``attention_2d``: kernels (forward.py, backward.py), configs (autotune.py) and
the torch ops with autograd (op.py). Importing this package needs ``triton``."""

from aanet_kernels._triton.op import attention_2d_triton

__all__ = ["attention_2d_triton"]
