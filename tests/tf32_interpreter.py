"""Triton's interpreter taught the TF32 products of a GPU's tensor cores.

The interpreter multiplies float32 operands of `tl.dot` exactly whatever precision the dot asks
for. On an NVIDIA GPU the default for float32 operands, TF32, keeps 10 of their 23 mantissa bits
(the tensor cores read the low 13 as zeros). `install()` makes the interpreter do the same, so a
kernel that leaves the default shows on the CPU the errors it has on a GPU. Import this module in
a process started with TRITON_INTERPRET=1 only (Triton reads it when it is imported).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from triton._C.libtriton import ir
from triton.runtime import interpreter

_exact_dot = interpreter.InterpreterBuilder.create_dot


def _tf32(data: np.ndarray) -> np.ndarray:
    if data.dtype != np.float32:
        return data
    return (data.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _tf32_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
    if input_precision == ir.INPUT_PRECISION.TF32:
        a = interpreter.TensorHandle(_tf32(a.data), a.dtype.scalar)
        b = interpreter.TensorHandle(_tf32(b.data), b.dtype.scalar)
    return _exact_dot(self, a, b, acc, input_precision, max_num_imprecise_acc)


def install() -> None:
    """From now on the interpreter's float32 `tl.dot` in TF32 (the default) truncates its operands."""
    interpreter.InterpreterBuilder.create_dot = _tf32_dot


@triton.jit
def _products(A, B, Default, Ieee, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(A + i[:, None] * N + i[None, :])
    b = tl.load(B + i[:, None] * N + i[None, :])
    tl.store(Default + i[:, None] * N + i[None, :], tl.dot(a, b))
    tl.store(Ieee + i[:, None] * N + i[None, :], tl.dot(a, b, input_precision="ieee"))


def probe(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a @ b of two (16, 16) float32 matrices through `tl.dot`: (default precision, IEEE)."""
    default, ieee = torch.empty_like(a), torch.empty_like(a)
    _products[(1,)](a, b, default, ieee, N=a.shape[0])
    return default, ieee
