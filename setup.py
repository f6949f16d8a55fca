"""Builds enginepy (from enginepy/), enginepy.kernels (from kernels/) and the extension enginepy._C (from csrc/).

Metadata and the build system are in pyproject.toml. The extension's sources are listed once, in
csrc/sources.txt, which CMakeLists.txt reads too. The .cu sources are built only where the installed torch
has CUDA and a CUDA toolkit is found. torch must be installed first and the project built without isolation
(`pip install --no-index --no-build-isolation --no-deps -e .`), so that the extension is compiled against the
torch that will load it; the build needs no index.
"""
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# Symbols of any static archive that ends up in _C stay local to it. A static libstdc++ in the link
# (-static-libstdc++ in a toolchain's or Python's flags) otherwise exports a second copy of the stream and
# locale code that the process's libstdc++ partly interposes, and formatting an integer then reads the
# wrong locale facet: truncated error messages, or a SIGSEGV (see csrc/ops.h; tests/test_build.py checks
# the built library).
LINK_ARGS = ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []


def extension_sources() -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources) from csrc/sources.txt, as paths relative to the repository root."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    sources = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [s for s in sources if not s.endswith(".cu")], [s for s in sources if s.endswith(".cu")]


def extension_build():
    """(ext_modules, cmdclass) for enginepy._C, CUDA sources included only where torch and the toolkit allow."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(
            "setup.py needs torch to build enginepy._C: install torch first, then run "
            "`pip install --no-index --no-build-isolation --no-deps -e .`"
        ) from exc

    cpp_sources, cuda_sources = extension_sources()
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cxx_flags = ["-O3"]
    if with_cuda:
        extension = cpp_extension.CUDAExtension(
            "enginepy._C",
            cpp_sources + cuda_sources,
            define_macros=[("ENGINEPY_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=LINK_ARGS,
        )
    else:
        extension = cpp_extension.CppExtension(
            "enginepy._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=LINK_ARGS
        )
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_build()

setup(
    packages=find_packages(include=["enginepy", "enginepy.*"]) + ["enginepy.kernels"],
    package_dir={"enginepy": "enginepy", "enginepy.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
