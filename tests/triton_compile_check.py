"""Compile our Triton kernels for a Hopper GPU (sm_90) without one: what triton's interpreter cannot check.

The interpreter runs kernels as numpy code, so typing and lowering errors (a constexpr reassigned in an unrolled
loop, an unsupported cast) only show when a kernel is compiled. Triton compiles to PTX and cubin (its bundled
ptxas) with no GPU present. Run by tests/test_hash_grid_triton.py in a subprocess without TRITON_INTERPRET (triton
reads it at import). Exit status: 0 compiled, 1 a kernel failed to compile, 3 this environment cannot compile.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1")

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as error:
    print(f"triton unavailable: {error}")
    sys.exit(3)

from gridinr_nerfstudio.fields.hash_grid import _triton as kernels  # noqa: E402
from gridinr_nerfstudio.fields.hash_grid import _triton_fused as fused  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def signatures(dtype: str) -> list[tuple]:
    positions = {"pos_ptr": f"*{dtype}"}
    grid = {"scales_ptr": f"*{dtype}", "info_ptr": "*i64"}
    return [
        (kernels._forward_kernel, {**positions, "params_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", **grid,
                                   "n": "i32", "out_stride": "i32", "shift": "fp32"}),
        (kernels._backward_params_kernel, {**positions, "grad_out_ptr": f"*{dtype}", "grad_params_ptr": f"*{dtype}",
                                           **grid, "n": "i32", "out_stride": "i32", "shift": "fp32"}),
        (kernels._backward_positions_kernel, {**positions, "params_ptr": f"*{dtype}", "grad_out_ptr": f"*{dtype}",
                                              "grad_pos_ptr": f"*{dtype}", **grid, "n": "i32", "num_levels": "i32",
                                              "out_stride": "i32", "shift": "fp32"}),
    ]


# Fused field inference: (levels, features, hidden layers, padded width) of the compact CPU field (8 x 1, linear
# decoder), the default field (16 x 2, two hidden layers of 64) and a one-hidden-layer field of width 16.
FUSED_SHAPES = ((8, 1, 0, 1), (16, 2, 2, 64), (4, 4, 1, 16))


def fused_signature(dtype: str) -> dict:
    return {"pos_ptr": f"*{dtype}", "params_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "scales_ptr": f"*{dtype}",
            "info_ptr": "*i64", **{name: f"*{dtype}" for name in ("w_in_ptr", "b_in_ptr", "w_hid_ptr", "b_hid_ptr",
                                                                   "w_out_ptr", "b_out_ptr")},
            "n": "i32", "shift": "fp32"}


def compile_kernel(fn, signature: dict, constexprs: dict, options: dict | None = None) -> None:
    try:
        source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                           constexprs=constexprs)
    except TypeError as error:  # another triton's ahead-of-time API: not our kernels
        print(f"cannot compile here (triton {triton.__version__} ASTSource API): {error}")
        sys.exit(3)
    try:
        compiled = triton.compile(source, target=TARGET, options=options)
    except (FileNotFoundError, PermissionError, OSError) as error:  # no ptxas, no cache dir: not our kernels
        print(f"cannot compile here: {error}")
        sys.exit(3)
    print(f"{fn.__name__} {constexprs} {options or ''}: {len(compiled.asm['ptx'])} chars of PTX", flush=True)


def _decoder(inputs: int, hidden: int, width: int) -> list:
    import torch

    sizes = [inputs] + [width] * hidden + [1]
    return [torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]


def main() -> None:
    features = [int(f) for f in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8").split(",")]
    dtypes = (sys.argv[2] if len(sys.argv) > 2 else "fp32,fp64").split(",")
    for dtype in dtypes:
        for fn, signature in signatures(dtype):
            for f in features:
                compile_kernel(fn, signature, {"F": f, "BLOCK_N": kernels.BLOCK})
        compile_kernel(kernels._sparse_adam_kernel,
                       {"param_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "exp_avg_ptr": f"*{dtype}",
                        "exp_avg_sq_ptr": f"*{dtype}", "n": "i64", "step_size": "fp32", "beta1": "fp32",
                        "beta2": "fp32", "eps": "fp32"}, {"BLOCK_N": 1024})
        for levels, per_level, hidden, width in FUSED_SHAPES:
            padded = fused.padded_sizes(levels, per_level, _decoder(levels * per_level, hidden, width))
            precisions = ("ieee", "tf32") if dtype == "fp32" and hidden else ("ieee",)
            for precision in precisions:
                compile_kernel(fused._fused_field_kernel, fused_signature(dtype),
                               {"L": levels, "L_PAD": padded[0], "F": per_level, "HIDDEN": hidden, "H_PAD": padded[1],
                                "DOT_PRECISION": precision, "BLOCK_N": fused.BLOCK},
                               {"num_warps": fused.num_warps(padded[1])})
    print("all kernels compiled for sm_90")


if __name__ == "__main__":
    main()
