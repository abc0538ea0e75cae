"""Compile every launch of kernels/decode.py for an H100/H200 (sm_90) with Triton's own compiler, no GPU needed.

    python tests/compile_worker.py   # run by tests/test_kernels.py::test_kernels_compile_for_sm90

The interpreter (TRITON_INTERPRET=1) runs a kernel as Python, and accepts code that Triton's
compiler rejects (a global that is not a ``tl.constexpr``, a type its front end cannot unify).
Here the wrappers run on small CPU tensors with their launches recorded instead of run; each
recorded launch, with the same argument types, constexprs and warps, is then compiled down to a
cubin. It must run without TRITON_INTERPRET, which makes ``@triton.jit`` build interpreted functions.
"""

from __future__ import annotations

import os
import sys

import torch

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32",
         torch.bool: "i1"}


def record_launches() -> list[tuple]:
    """(kernel, arguments by name, options) of every launch the wrappers make over their variants."""
    from retro_compile.kernels import decode
    from retro_compile.kernels import reference as ref

    launches = []

    def recorded(kernel):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            launches.append((kernel, {**dict(zip(kernel.arg_names, args)), **kwargs}, options))
        return type("Launcher", (), {"__getitem__": lambda self, grid: launch})()

    decode.wrap_triton = recorded
    b, hq, hkv, n, d, page, pages = 2, 8, 2, 2, 64, 16, 4096
    length = pages * page
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.zeros(b, hq, n, d, dtype=dtype)
        k = v = torch.zeros(b, hkv, length, d, dtype=dtype)
        allowed = torch.ones(b, n, length, dtype=torch.bool)
        position = torch.full((b, n), length - 1)
        state = ref.LayerState(torch.zeros(b, hkv, pages, d, dtype=dtype), torch.zeros(b, hkv, pages, d, dtype=dtype),
                               torch.zeros(b, hkv, pages, dtype=torch.int32), torch.zeros(b, hq, n - 1, d),
                               torch.zeros(b, hq, n - 1))
        decode.summarize_pages(state.kmax, state.kmin, k, allowed[:, -1], position[:, 0], 2, page)
        for as_products in (False, True):
            decode.page_scores(q[:, :, -1], state.kmax, state.kmin, allowed[:, -1], page, as_products=as_products)
        scores = torch.zeros(b, hkv, pages)
        for fraction, chunk in ((0.0, 0), (0.0, 1024), (0.5, 0)):
            params = ref.SparseParams(page, 128, fraction, 1, 1, n)
            decode.top_pages(scores, position[:, -1], params, chunk)
        indices, chosen = torch.zeros(b, hkv, 128, dtype=torch.int64), torch.ones(b, hkv, 128, dtype=torch.bool)
        decode.attend_window(q, k, v, allowed, None, indices, chosen, state, position, 0.125, page)
        decode.dense_window(q, k, v, allowed, 0.125)
    return launches


def compile_launch(kernel, arguments: dict, options: dict) -> None:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = {}, {}
    for param in kernel.params:
        value = arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i64" if abs(int(value)) >= 2**31 else "i32"
    triton_compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_worker: unset TRITON_INTERPRET (it makes @triton.jit build interpreted functions)")
    failures = 0
    launches = record_launches()
    for kernel, arguments, options in launches:
        try:
            compile_launch(kernel, arguments, options)
        except Exception as error:  # every failing launch is reported, not only the first
            failures += 1
            print(f"{kernel.__name__}: {type(error).__name__}: {error}", file=sys.stderr)
    print(f"{len(launches) - failures} of {len(launches)} launches compiled for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
