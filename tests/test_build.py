"""The built extension enginepy._C is linked the way its error messages need (csrc/ops.h), and the build
declares what an offline, isolation-free `pip install --no-index --no-build-isolation -e .` needs."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_binutils = pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")

# Demangled prefixes of code and data that only libstdc++ itself (or its static archive) defines.
_RUNTIME_PREFIXES = ("std::", "__gnu_cxx::", "__cxxabiv1::", "__cxa_", "operator new", "operator delete")
_RUNTIME_WRAPPERS = ("vtable for ", "construction vtable for ", "VTT for ", "typeinfo for ", "typeinfo name for ",
                     "guard variable for ", "transaction clone for ")


def exported_cxx_runtime(library: str) -> list[str]:
    """Strong definitions of C++ runtime symbols in the dynamic symbol table of `library`.

    Header templates instantiated in the library are weak (W/V/u) and harmless; a strong (T/D/B/R) std::
    definition means a copy of libstdc++ itself was linked in and exported, where the process's libstdc++
    interposes some of its symbols and not others (the crash that csrc/ops.h describes).
    """
    out = subprocess.run(["nm", "-D", "--defined-only", "-C", library], capture_output=True, text=True, check=True)
    found = []
    for line in out.stdout.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) < 3 or parts[1] not in "TDBR":
            continue
        name = parts[2]
        for wrapper in _RUNTIME_WRAPPERS:
            name = name.removeprefix(wrapper)
        if name.startswith(_RUNTIME_PREFIXES):
            found.append(parts[2])
    return found


@needs_binutils
def test_extension_exports_no_copy_of_the_cxx_runtime():
    from enginepy import _C

    exported = exported_cxx_runtime(_C.__file__)
    assert not exported, (f"{_C.__file__} exports {len(exported)} libstdc++ symbols, e.g. {exported[:5]}: a static "
                          "libstdc++ was linked in without --exclude-libs,ALL (see setup.py)")


@needs_binutils
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_check_flags_an_exported_static_libstdcxx_and_passes_a_contained_one(tmp_path):
    """The check above can fail: a library linked with -static-libstdc++ is flagged, and the same library with
    --exclude-libs,ALL (setup.py's link flag) or with the shared libstdc++ is not."""
    static_archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not Path(static_archive).is_file():
        pytest.skip("this g++ has no static libstdc++")
    source = tmp_path / "format.cpp"
    source.write_text('#include <sstream>\n#include <string>\n'
                      'std::string format(long value) { std::ostringstream s; s << value; return s.str(); }\n')

    def build(name: str, *flags: str) -> str:
        out = tmp_path / f"{name}.so"
        subprocess.run(["g++", "-O1", "-fPIC", "-shared", str(source), "-o", str(out), *flags], check=True)
        return str(out)

    assert exported_cxx_runtime(build("static", "-static-libstdc++"))
    assert not exported_cxx_runtime(build("contained", "-static-libstdc++", "-Wl,--exclude-libs,ALL"))
    assert not exported_cxx_runtime(build("shared"))


def test_build_system_builds_without_isolation_or_index():
    """pyproject.toml names setuptools' PEP 517 backend, so pip never runs `setup.py develop` (whose nested pip
    ignores --no-build-isolation and goes to the index); the Makefile builds with --no-index."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["build-system"]["build-backend"] == "setuptools.build_meta"
    assert not any(req.startswith("torch") for req in pyproject["build-system"]["requires"]), \
        "an isolated build must not fetch its own torch"
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --no-index --no-build-isolation --no-deps -e ." in makefile.replace("$(PIP)", "pip")

