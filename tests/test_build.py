"""The native library is tied to the llama-cpp-python it was built against."""

import subprocess
import sys

import llama_cpp

from pykvcompose import _native


def pinned_version() -> str:
    """The llama-cpp-python version pyproject.toml pins (its one home)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    return re.search(r'"llama-cpp-python==([0-9.]+)"', text).group(1)


def test_library_reports_the_llama_cpp_python_it_was_built_against():
    built = _native.ffi.string(_native._lib.kvc_llama_cpp_python_version()).decode()
    assert built == llama_cpp.__version__ == pinned_version()
    assert _native._lib.kvc_api_version() == _native.API_VERSION == _native._lib.KVC_API_VERSION


def test_the_binding_is_read_from_the_header_it_ships_with():
    """Every function the header exports is bound with the header's own parameter list, every enum
    constant has the header's value: nothing is kept by hand beside kvcompose.h."""
    import re

    header = _native._header_path(_native._LIBRARY).read_text()
    text = re.sub(r"/\*.*?\*/", " ", header, flags=re.S)
    functions = re.findall(r"KVC_API\s+[\w\s\*]*?\b(kvc_\w+)\s*\(([^)]*)\)", text)
    assert len(functions) >= 27
    for name, params in functions:
        bound = _native.ffi.typeof(getattr(_native._lib, name))
        n_params = 0 if params.strip() == "void" else params.count(",") + 1
        assert len(bound.args) == n_params, name
    for name, value in re.findall(r"\b(KVC_\w+)\s*=\s*(\d+)", text):
        assert getattr(_native._lib, name) == int(value) == getattr(_native, name, int(value)), name
    assert _native.KVC_ERR_LLAMA == 5 and _native.AGG_BY_NAME == {"max": 0, "mean": 1}


def test_header_declarations_become_cdef_text():
    header = (
        '/* doc */\n#ifndef X\n#define X\n#include <stdint.h>\n#ifdef __cplusplus\nextern "C" {\n#endif\n'
        '#define KVC_API __attribute__((visibility("default")))\n#define KVC_API_VERSION 9\n'
        "enum kvc_e { KVC_A = 0, /* one */ KVC_B = 2 };\n"
        "KVC_API int32_t kvc_f(const float * x, // trailing\n int32_t n);\n"
        "#ifdef __cplusplus\n}\n#endif\n#endif\n"
    )
    cdef = _native.declarations(header)
    assert "KVC_API " not in cdef and "#include" not in cdef and "extern" not in cdef and "/*" not in cdef
    ffi = _native.cffi.FFI()
    ffi.cdef(cdef)
    assert ffi.typeof("int32_t(*)(const float *, int32_t)") is not None
    assert "#define KVC_API_VERSION 9" in cdef


def test_version_mismatch_raises_import_error_saying_how_to_fix_it():
    code = (
        "import importlib.metadata as m\n"
        "orig = m.version\n"
        "m.version = lambda name: '0.3.99' if name == 'llama-cpp-python' else orig(name)\n"
        "try:\n"
        "    import pykvcompose\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ImportError:"), out
    assert pinned_version() in out and "0.3.99" in out and "reinstall" in out


def test_native_library_links_the_installed_llama_cpp():
    """One llama.cpp in the process: the libllama our library resolved is llama_cpp's own."""
    import pathlib

    maps = pathlib.Path("/proc/self/maps").read_text()
    libs = {line.split()[-1] for line in maps.splitlines() if "libllama.so" in line}
    assert len(libs) == 1, libs
    assert pathlib.Path(llama_cpp.__file__).parent.resolve() in pathlib.Path(libs.pop()).resolve().parents
