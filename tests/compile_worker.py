"""Check every launch of the Triton stages (kernels/decode.py) as a GPU build would see it, on a machine without one.

    python tests/compile_worker.py   # run by tests/test_kernels.py::test_kernels_compile_for_sm90

1. Triton's own compiler takes each launch down to an sm_90 (H100/H200) cubin. The interpreter
   (TRITON_INTERPRET=1) runs a kernel as Python and accepts code the compiler rejects (a global
   that is not a ``tl.constexpr``, a type its front end cannot unify).
2. Inductor's analysis of which tensors a kernel writes finds exactly the kernel's outputs
   (:data:`WRITES`). Inductor copies any input it believes written before the launch, so a
   helper that made an input look written costs a copy kernel in every compiled step.
3. AOTAutograd's compile cache keys a graph that calls ``retro::attention`` or
   ``retro::dense_window`` on the source of every kernel (``op._declare_kernels``): a graph
   compiled before a kernel changed is not served after.

The wrappers run on small CPU tensors with their launches recorded instead of run; each recorded
launch keeps its argument types, constexprs and warps. It must run without TRITON_INTERPRET,
which makes ``@triton.jit`` build interpreted functions.
"""

from __future__ import annotations

import os
import sys

import torch

WRITES = {  # what each kernel is meant to write
    "_summarize_pages_kernel": {"KMAX", "KMIN"},
    "_page_scores_kernel": {"OUT", "KMAX", "KMIN"},  # the summaries only with REFRESH pages
    "_top_pages_kernel": {"IDX", "CHOSEN", "CAND_SCORE", "CAND_PAGE", "COUNTS"},  # candidates only in chunks
    "_window_attention_kernel": {"LAST", "OUT", "LSE"},  # `last` only for selected pages (not DENSE)
    "_merge_window_kernel": {"OUT_CACHE", "LSE_CACHE", "OUT"},  # the output cache only if it has rows
}


def expected_writes(kernel_name: str, arguments: dict) -> set[str]:
    """:data:`WRITES`, less what this launch's constexprs leave out."""
    writes = set(WRITES[kernel_name])
    if arguments.get("REFRESH") == 0:
        writes -= {"KMAX", "KMIN"}
    if arguments.get("DENSE"):
        writes -= {"LAST"}
    if arguments.get("CHUNK") == 0:
        writes -= {"CAND_SCORE", "CAND_PAGE", "COUNTS"}
    if arguments.get("CACHE") == 0:
        writes -= {"OUT_CACHE", "LSE_CACHE"}
    return writes
TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size: an H100/H200
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32",
         torch.int8: "i8", torch.bool: "i1"}


def record_launches() -> list[tuple]:
    """(kernel, arguments by name, options) of every launch the wrappers make over their variants."""
    from retro_compile.kernels import decode
    from retro_compile.kernels import reference as ref
    from retro_compile.state import LayerState

    launches = []

    def recorded(kernel):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            launches.append((kernel, {**dict(zip(kernel.arg_names, args)), **kwargs}, options))
        return type("Launcher", (), {"__getitem__": lambda self, grid: launch})()

    for module in decode.STAGE_MODULES:
        module.wrap_triton = recorded
    b, hq, hkv, n, d, page, pages = 2, 8, 2, 2, 64, 16, 4096
    length = pages * page
    for dtype, table_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                               (torch.bfloat16, torch.int8), (torch.float32, torch.int8)):
        q = torch.zeros(b, hq, n, d, dtype=dtype)
        k = v = torch.zeros(b, hkv, length, d, dtype=dtype)
        allowed = torch.ones(b, n, length, dtype=torch.bool)
        position = torch.full((b, n), length - 1)
        state = LayerState(torch.zeros(b, hkv, pages, d, dtype=table_dtype),
                               torch.zeros(b, hkv, pages, d, dtype=table_dtype),
                               torch.zeros(b, hkv, pages, dtype=torch.int32), torch.zeros(b, hq, n - 1, d),
                               torch.zeros(b, hq, n - 1), torch.ones(b, hkv, d),
                               torch.zeros(b, dtype=torch.int32))
        decode.summarize_pages(state.kmax, state.kmin, k, allowed[:, -1], position[:, 0], 2, page, state.summary_scale)
        for as_products in (False, True):
            for refresh in (None, ref.PageRefresh(k, position[:, 0], 2)):
                decode.page_scores(q[:, :, -1], state.kmax, state.kmin, allowed[:, -1], page, as_products=as_products,
                                   refresh=refresh, summary_scale=state.summary_scale,
                                   blocks_per_program=4 if as_products else 1)
        if table_dtype == torch.int8:
            continue  # the other kernels never read the summaries
        scores = torch.zeros(b, hkv, pages)
        for fraction, chunk in ((0.0, 0), (0.0, 1024), (0.5, 0)):
            params = ref.SparseParams(page, 128, fraction, 1, 1, n)
            decode.top_pages(scores, position[:, -1], params, chunk_pages=chunk)
        indices, chosen = torch.zeros(b, hkv, 128, dtype=torch.int64), torch.ones(b, hkv, 128, dtype=torch.bool)
        for split, tile, stages in ((None, None, None), (8, 8, 1)):  # pipelined 4-page tiles; one unpipelined tile
            decode.attend_window(q, k, v, allowed, None, indices, chosen, state, position, 0.125, page, split, tile,
                                 num_stages=stages)
        decode.dense_window(q, k, v, allowed, 0.125)
    return launches


def activate_target() -> None:
    """Make TARGET the active driver's target: Inductor's analysis asks the driver for it, and a
    machine without a GPU has none."""
    import triton
    from triton.backends.compiler import GPUTarget

    class Target:
        def get_current_target(self):
            return GPUTarget(*TARGET)

    triton.runtime.driver.set_active(Target())


def written_tensors(kernel, arguments: dict) -> set[str]:
    """The arguments Inductor's analysis (the one behind ``wrap_triton``) finds the kernel writes."""
    from torch._higher_order_ops import triton_kernel_wrap

    analyze = getattr(triton_kernel_wrap, "identify_accessed_tensors", None)
    if analyze is None:  # before torch 2.12: a list of the written names
        return set(triton_kernel_wrap.identify_mutated_tensors(kernel, dict(arguments), {}))
    return {dep.name for dep in analyze(kernel, dict(arguments), {}).read_writes.writes}


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
    triton_compile(ASTSource(kernel, signature, constexprs), target=GPUTarget(*TARGET), options=options)


def check_cache_keys() -> None:
    """Every kernel of :data:`WRITES` is in the sources AOTAutograd's cache key holds for a graph
    calling each op."""
    import torch.fx as fx
    from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCacheDetails

    import retro_compile.kernels.op  # noqa: F401  (registers the ops)

    for op in (torch.ops.retro.attention.default, torch.ops.retro.dense_window.default):
        graph = fx.Graph()
        graph.output(graph.call_function(op, ()))
        details = AOTAutogradCacheDetails.__new__(AOTAutogradCacheDetails)  # the method reads no fields
        sources = "\n".join(details.get_triton_source_codes_from_gm(fx.GraphModule({}, graph)))
        missing = [name for name in WRITES if f"def {name}(" not in sources]
        if missing:
            raise AssertionError(f"{op}: the compile cache key leaves out {missing}")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_worker: unset TRITON_INTERPRET (it makes @triton.jit build interpreted functions)")
    failures = 0
    activate_target()
    launches = record_launches()
    for kernel, arguments, options in launches:
        try:  # every failing launch is reported, not only the first
            compile_launch(kernel, arguments, options)
            expected = expected_writes(kernel.__name__, arguments)
            written = written_tensors(kernel, arguments)
            if written != expected:
                raise AssertionError(f"Inductor finds it writes {sorted(written)}, not {sorted(expected)}")
        except Exception as error:
            failures += 1
            print(f"{kernel.__name__}: {type(error).__name__}: {error}", file=sys.stderr)
    print(f"{len(launches) - failures} of {len(launches)} launches compiled for sm_90 and write what they should")
    try:
        check_cache_keys()
        print("the compile cache keys on every kernel's source")
    except Exception as error:
        failures += 1
        print(f"cache key: {type(error).__name__}: {error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
