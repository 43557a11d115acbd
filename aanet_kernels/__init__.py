"""aanet-kernels: fused attention-augmented convolution (AA-Conv) for PyTorch."""

from aanet_kernels import functional, nn
from aanet_kernels.backends import BACKENDS, available_backends, resolve_backend, use_backend
from aanet_kernels.functional import aa_conv2d
from aanet_kernels.nn import AAConv2d, augment_model
from aanet_kernels.ops import attention_2d
from aanet_kernels.reference import attention_2d_reference
from aanet_kernels.relative import relative_logits

__version__ = "0.1.0"

__all__ = [
    "AAConv2d",
    "aa_conv2d",
    "augment_model",
    "functional",
    "nn",
    "BACKENDS",
    "attention_2d",
    "attention_2d_reference",
    "available_backends",
    "relative_logits",
    "resolve_backend",
    "use_backend",
]
