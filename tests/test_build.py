"""The native library is tied to the llama-cpp-python it was built against."""

import subprocess
import sys

import llama_cpp

from pykvcompose import _native


def test_library_reports_the_llama_cpp_python_it_was_built_against():
    assert _native._lib.kvc_llama_cpp_python_version().decode() == llama_cpp.__version__ == "0.3.36"
    assert _native._lib.kvc_api_version() == _native.API_VERSION


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
    assert "0.3.36" in out and "0.3.99" in out and "reinstall" in out


def test_native_library_links_the_installed_llama_cpp():
    """One llama.cpp in the process: the libllama our library resolved is llama_cpp's own."""
    import pathlib

    maps = pathlib.Path("/proc/self/maps").read_text()
    libs = {line.split()[-1] for line in maps.splitlines() if "libllama.so" in line}
    assert len(libs) == 1, libs
    assert pathlib.Path(llama_cpp.__file__).parent.resolve() in pathlib.Path(libs.pop()).resolve().parents
