"""Build the optional C++/OpenMP hash-grid kernels at install time.

Metadata lives in pyproject.toml. The extension needs torch in the build environment, so
the Makefile installs with ``pip install --no-build-isolation``. If it cannot be built the
package still works: ``hash_encoding`` falls back to its pure-PyTorch path.
"""
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
_src = os.path.join("gridinr_nerfstudio", "csrc", "hash_grid.cpp")
if os.path.exists(_src) and os.environ.get("GRIDINR_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        ext_modules.append(
            CppExtension(
                name="gridinr_nerfstudio._hash_grid_cpp",
                sources=[_src],
                # -fno-trapping-math / -fno-math-errno let GCC vectorise the float->int cell index loop and the
                # sqrt of the Adam step; -ffp-contract=off keeps x * scale + shift rounded like the pure-PyTorch
                # fallback (no FMA contraction).
                extra_compile_args=[
                    "-O3",
                    *(["-march=x86-64-v2"] if os.uname().machine == "x86_64" else []),
                    "-fno-trapping-math",
                    "-fno-math-errno",
                    "-ffp-contract=off",
                    *openmp,
                ],
                extra_link_args=openmp,
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    except ImportError:  # torch absent in an isolated build: pure-PyTorch fallback
        print("gridinr-nerfstudio: torch not importable at build time; skipping the C++ hash-grid kernels")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
