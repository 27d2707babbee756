"""Build the optional C++/OpenMP kernels at install time: the hash grid and the fused ray marcher.

Metadata lives in pyproject.toml. The extensions need torch in the build environment, so
the Makefile installs with ``pip install --no-build-isolation``. If one cannot be built the
package still works: ``hash_encoding`` falls back to its pure-PyTorch path, and the renderer
(``rendering/fused_march.py``) to the torch ray marcher (``rendering/raymarch.py``).
"""
import os
import subprocess
import sys

from setuptools import setup
from setuptools.errors import CCompilerError, ExecError, PlatformError

ext_modules = []


def _march_flags() -> list:
    """Vector instructions of the building CPU (AVX2/AVX-512 make the kernels ~1.7x faster than SSE4), since the
    extension is built where it runs (pip install -e), with 512-bit vectors where the CPU has them (GCC prefers
    256 bits by default); GRIDINR_PORTABLE_BUILD=1 targets any x86-64-v2 CPU instead."""
    if os.uname().machine != "x86_64":
        return []
    if os.environ.get("GRIDINR_PORTABLE_BUILD", "0") == "1":
        return ["-march=x86-64-v2"]
    return ["-march=native", "-mprefer-vector-width=512"]

cmdclass = {}
# (extension module, C++ source, what the package does without it)
_EXTENSIONS = [
    ("gridinr_nerfstudio.fields.hash_grid._hash_grid_cpp",
     os.path.join("gridinr_nerfstudio", "fields", "hash_grid", "csrc", "hash_grid.cpp"), "the pure-PyTorch hash grid"),
    ("gridinr_nerfstudio.rendering._raymarch_cpp",
     os.path.join("gridinr_nerfstudio", "rendering", "csrc", "raymarch.cpp"), "the torch ray marcher"),
]
_FALLBACKS = {name: fallback for name, _, fallback in _EXTENSIONS}
if os.environ.get("GRIDINR_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        for _name, _src, _ in _EXTENSIONS:
            if not os.path.exists(_src):
                continue
            ext_modules.append(
                CppExtension(
                    name=_name,
                    sources=[_src],
                    # csrc/work_sharing.h: the kernels' parallel loops (dynamic packets, an explicit thread count)
                    include_dirs=[os.path.abspath(os.path.join("gridinr_nerfstudio", "csrc"))],
                    # -fno-trapping-math / -fno-math-errno let GCC vectorise the float->int cell index loop and the
                    # sqrt of the Adam step; -ffp-contract=off keeps x * scale + shift rounded like the pure-PyTorch
                    # fallback (no FMA contraction).
                    extra_compile_args=[
                        "-O3",
                        *_march_flags(),
                        "-fno-trapping-math",
                        "-fno-math-errno",
                        "-ffp-contract=off",
                        *openmp,
                    ],
                    extra_link_args=openmp,
                )
            )

        class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
            """A failed compile (no compiler, no OpenMP) leaves the package on its torch paths."""

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except (
                    CCompilerError, ExecError, PlatformError, subprocess.CalledProcessError, OSError, RuntimeError
                ) as error:
                    print(f"gridinr-nerfstudio: could not build {ext.name} ({error}); using {_FALLBACKS[ext.name]}")
                    self.extensions = [other for other in self.extensions if other is not ext]  # nothing to copy

        cmdclass["build_ext"] = OptionalBuildExtension
    except ImportError:  # torch absent in an isolated build: pure-PyTorch fallback
        print("gridinr-nerfstudio: torch not importable at build time; skipping the C++ kernels")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
