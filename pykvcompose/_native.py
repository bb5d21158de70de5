"""cffi binding to ``libkvcompose``: the declarations are read from ``kvcompose.h`` itself (cffi's ABI
mode, no compiler at import), so no signature, struct or enum here can drift from the header.

Status codes become :class:`NativeError` (or a subclass); wrapper objects own native memory; arrays
go in and out as numpy. ``llama_cpp`` is imported first so that the ``libllama``/``libggml-base`` it
loaded are the ones this library binds to (same SONAME, same process): there is never a second copy
of llama.cpp.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import pathlib
import re
import sys
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import cffi
import llama_cpp  # noqa: F401  (loads libllama/libggml into the process first)
import numpy as np

if TYPE_CHECKING:
    from ._capture import Capture

from .errors import (  # noqa: F401  (re-exported: the core's callers catch them here)
    CorruptStateError,
    InvalidArgumentError,
    LlamaRefusedError,
    NativeError,
    NativeMemoryError,
    UnsupportedCacheError,
)

#: The header version this Python code was written for (checked against the header and the library).
API_VERSION = 10


def _library_path() -> pathlib.Path:
    name = "libkvcompose.so" if sys.platform != "darwin" else "libkvcompose.dylib"
    here = pathlib.Path(__file__).resolve().parent
    override = os.environ.get("PYKVCOMPOSE_LIBRARY")
    if override:  # another build of the same sources, e.g. the sanitizer build of `make test-asan`
        if not pathlib.Path(override).is_file():
            raise ImportError(f"PYKVCOMPOSE_LIBRARY={override} is not a file")
        return pathlib.Path(override)
    # next to this file when installed; in site-packages when this module runs from a source tree
    candidates = [here / name] + [pathlib.Path(p) / "pykvcompose" / name for p in sys.path if p]
    for c in candidates:
        if c.is_file():
            return c
    raise ImportError(
        f"pykvcompose's native library {name} was not found next to {here} nor on sys.path; "
        "install the package (`make install`, or `pip install --no-build-isolation .` after llama-cpp-python)"
    )


def _header_path(library: pathlib.Path) -> pathlib.Path:
    """``kvcompose.h``: installed beside the library; in a source tree, ``native/include``."""
    here = pathlib.Path(__file__).resolve().parent
    for c in (library.parent / "kvcompose.h", here / "kvcompose.h", here.parent / "native" / "include" / "kvcompose.h"):
        if c.is_file():
            return c
    raise ImportError(f"kvcompose.h was not found beside {library} nor in the source tree; reinstall pykvcompose")


def declarations(header: str) -> str:
    """The C declarations of ``kvcompose.h`` as cffi's ``cdef`` reads them: comments, preprocessor lines,
    the ``extern "C"`` wrapper and the ``KVC_API`` export macro removed, the version kept as a constant."""
    text = re.sub(r"/\*.*?\*/", " ", header, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    version = re.search(r"^\s*#\s*define\s+KVC_API_VERSION\s+(\d+)", text, flags=re.M)
    if version is None:
        raise ImportError("kvcompose.h defines no KVC_API_VERSION")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace('extern "C" {', "")
    text = re.sub(r"\bKVC_API\b", "", text)
    text = text.strip()
    if text.endswith("}"):  # the closing brace of extern "C"
        text = text[:-1]
    return text + f"\n#define KVC_API_VERSION {version.group(1)}\n"


_LIBRARY = _library_path()
ffi = cffi.FFI()
ffi.cdef(declarations(_header_path(_LIBRARY).read_text()))
_lib = ffi.dlopen(str(_LIBRARY))


def _check_versions() -> None:
    built = ffi.string(_lib.kvc_llama_cpp_python_version()).decode()
    installed = importlib.metadata.version("llama-cpp-python")
    fix = (
        f"reinstall with `pip install --no-build-isolation --force-reinstall pykvcompose` against "
        f"llama-cpp-python=={installed}, or install llama-cpp-python=={built}"
    )
    if installed != built:
        raise ImportError(
            f"pykvcompose was compiled against llama-cpp-python {built}'s llama.cpp but {installed} is installed: {fix}"
        )
    if _lib.kvc_api_version() != API_VERSION or _lib.KVC_API_VERSION != API_VERSION:
        raise ImportError(
            f"libkvcompose has API version {_lib.kvc_api_version()} (header {_lib.KVC_API_VERSION}), this Python "
            f"code expects {API_VERSION}: the installed native library and the Python sources are out of step; "
            "reinstall pykvcompose"
        )
    if _lib.kvc_sizeof_llama_context_params() != ctypes.sizeof(llama_cpp.llama_context_params):
        raise ImportError(f"llama_context_params differs between pykvcompose and llama-cpp-python {installed}: {fix}")


_check_versions()

# status codes (enum kvc_status), aggregations (enum kvc_agg), cache halves (enum kvc_part), reduction
# places (enum kvc_reduce): from the header
KVC_OK = _lib.KVC_OK
KVC_ERR_INVALID_ARGUMENT = _lib.KVC_ERR_INVALID_ARGUMENT
KVC_ERR_CORRUPT_STATE = _lib.KVC_ERR_CORRUPT_STATE
KVC_ERR_UNSUPPORTED = _lib.KVC_ERR_UNSUPPORTED
KVC_ERR_OUT_OF_MEMORY = _lib.KVC_ERR_OUT_OF_MEMORY
KVC_ERR_LLAMA = _lib.KVC_ERR_LLAMA
KVC_ERR_CAPTURE = _lib.KVC_ERR_CAPTURE
KVC_ERR_INTERNAL = _lib.KVC_ERR_INTERNAL
KVC_AGG_MAX = _lib.KVC_AGG_MAX
KVC_AGG_MEAN = _lib.KVC_AGG_MEAN
KVC_PART_K = _lib.KVC_PART_K
KVC_PART_V = _lib.KVC_PART_V
AGG_BY_NAME = {"max": KVC_AGG_MAX, "mean": KVC_AGG_MEAN}
REDUCE_BY_NAME = {"backend": _lib.KVC_REDUCE_BACKEND, "host": _lib.KVC_REDUCE_HOST}

#: address of kvc_capture_eval_callback, for llama_context_params.cb_eval (a C function: no Python per tensor)
EVAL_CALLBACK_ADDRESS = int(ffi.cast("uintptr_t", _lib.kvc_capture_eval_callback))


_ERROR_CLASS = {
    KVC_ERR_INVALID_ARGUMENT: InvalidArgumentError,
    KVC_ERR_CORRUPT_STATE: CorruptStateError,
    KVC_ERR_UNSUPPORTED: UnsupportedCacheError,
    KVC_ERR_OUT_OF_MEMORY: NativeMemoryError,
    KVC_ERR_LLAMA: LlamaRefusedError,
}


def _check(status: int, function: str) -> None:
    if status != KVC_OK:
        detail = ffi.string(_lib.kvc_last_error()).decode(errors="replace")
        name = ffi.string(_lib.kvc_status_str(status)).decode()
        raise _ERROR_CLASS.get(status, NativeError)(status, f"{function}: {name}", detail)


def _f32(a: np.ndarray, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"expected an array of shape {tuple(shape)}, got {a.shape}")
    return a


def _ptr(a: np.ndarray, ctype: str):
    """A ``ctype *`` to a contiguous array's data (the caller keeps ``a`` alive during the call)."""
    return ffi.cast(ctype + " *", a.ctypes.data)


def _part(part: str) -> int:
    try:
        return {"k": KVC_PART_K, "v": KVC_PART_V}[part]
    except KeyError:
        raise ValueError(f"part must be 'k' or 'v', got {part!r}") from None


def _ctx_ptr(ctx):
    """``struct llama_context *`` of a llama_cpp context handle (a ctypes pointer or an int)."""
    return ffi.cast("struct llama_context *", ctypes.cast(ctx, ctypes.c_void_p).value or 0)


def _fields(struct) -> dict:
    return {name: getattr(struct, name) for name, _ in ffi.typeof(struct).item.fields}


# ---- scoring and selection (the attention capture's owner is _capture.Capture) ------------------
def kvcompose_score(
    head_scores: np.ndarray,
    n_head_kv: int,
    agg_group: str = "mean",
    value_norms: Optional[np.ndarray] = None,
    add_mean_across_heads: bool = True,
) -> np.ndarray:
    """``[n_layer, n_head, n]`` probe attention -> ``[n_layer, n_head_kv, n]`` KVCompose token scores."""
    hs = _f32(head_scores)
    if hs.ndim != 3:
        raise ValueError(f"head_scores must be [n_layer, n_head, n_tokens], got shape {hs.shape}")
    n_layer, n_head, n = hs.shape
    if agg_group not in AGG_BY_NAME:
        raise ValueError(f"unknown agg_group {agg_group!r}; expected one of {sorted(AGG_BY_NAME)}")
    vn = None if value_norms is None else _f32(value_norms, (n_layer, n_head_kv, n))
    out = np.empty((n_layer, n_head_kv, n), dtype=np.float32)
    _check(
        _lib.kvc_kvcompose_score(
            _ptr(hs, "float"),
            n_layer,
            n_head,
            n_head_kv,
            n,
            AGG_BY_NAME[agg_group],
            ffi.NULL if vn is None else _ptr(vn, "float"),
            add_mean_across_heads,
            _ptr(out, "float"),
        ),
        "kvc_kvcompose_score",
    )
    return out


def kvcompose_layer_budgets(
    scores: np.ndarray, n_total_keep: int, agg_head: str = "mean", keep_token_lower_bound: int = 0
) -> np.ndarray:
    """The paper's per-layer budgets ``[n_layer]`` for ``n_total_keep`` kept (layer, rank) slots."""
    s = _f32(scores)
    if s.ndim != 3:
        raise ValueError(f"scores must be [n_layer, n_head_kv, n_tokens], got shape {s.shape}")
    if agg_head not in AGG_BY_NAME:
        raise ValueError(f"unknown agg_head {agg_head!r}; expected one of {sorted(AGG_BY_NAME)}")
    out = np.empty(s.shape[0], dtype=np.int32)
    _check(
        _lib.kvc_kvcompose_layer_budgets(
            _ptr(s, "float"),
            *s.shape,
            int(n_total_keep),
            AGG_BY_NAME[agg_head],
            int(keep_token_lower_bound),
            _ptr(out, "int32_t"),
        ),
        "kvc_kvcompose_layer_budgets",
    )
    return out


def scores_consensus(scores: np.ndarray, weight: float) -> np.ndarray:
    """Blend each head's mean-normalised scores with their mean over all layers and heads."""
    s = _f32(scores)
    if s.ndim != 3:
        raise ValueError(f"scores must be [n_layer, n_head_kv, n_tokens], got shape {s.shape}")
    out = np.empty_like(s)
    _check(
        _lib.kvc_scores_consensus(_ptr(s, "float"), *s.shape, float(weight), _ptr(out, "float")), "kvc_scores_consensus"
    )
    return out


def select_top(scores: np.ndarray, n_keep: int, forced: Sequence[int] = ()) -> np.ndarray:
    """Per row of ``scores[..., n_tokens]`` the ascending indices of its top ``n_keep`` (``forced`` always kept)."""
    s = _f32(scores)
    n_tokens = s.shape[-1]
    rows = s.reshape(-1, n_tokens)
    f = np.ascontiguousarray(np.asarray(forced, dtype=np.int32).reshape(-1))
    out = np.empty((rows.shape[0], n_keep), dtype=np.int32)
    _check(
        _lib.kvc_select_top(
            _ptr(rows, "float"),
            rows.shape[0],
            n_tokens,
            int(n_keep),
            _ptr(f, "int32_t") if f.size else ffi.NULL,
            f.size,
            _ptr(out, "int32_t"),
        ),
        "kvc_select_top",
    )
    return out.reshape(s.shape[:-1] + (n_keep,))


# ---- state buffers -------------------------------------------------------------------------
def _buf(data: bytes):
    arr = np.frombuffer(data, dtype=np.uint8)
    return arr, (_ptr(arr, "uint8_t") if arr.size else ffi.NULL)


def _info_dict(info, positions: Optional[np.ndarray]) -> dict:
    d = _fields(info)
    if positions is not None:
        d["positions"] = positions[: info.n_cells].copy()
    return d


def state_parse(data: bytes) -> dict:
    """Validate a ``llama_state_seq_get_data`` buffer and describe it (with cell ``positions``)."""
    arr, p = _buf(data)
    info = ffi.new("kvc_state_info *")
    _check(_lib.kvc_state_parse(p, arr.size, info, ffi.NULL, 0), "kvc_state_parse")
    positions = np.empty(max(1, info.n_cells), dtype=np.int32)
    _check(_lib.kvc_state_parse(p, arr.size, info, _ptr(positions, "int32_t"), positions.size), "kvc_state_parse")
    return _info_dict(info, positions)


def _selection(selection: np.ndarray) -> np.ndarray:
    sel = np.ascontiguousarray(selection, dtype=np.int32)
    if sel.ndim != 3:
        raise ValueError(f"selection must be [n_layer, n_head_kv, n_keep], got shape {sel.shape}")
    return sel


def state_compose(data: bytes, selection: np.ndarray) -> bytes:
    """Compose ``selection[layer, kv_head, cell]`` of the source cells into a new state buffer."""
    arr, p = _buf(data)
    sel = _selection(selection)
    size = ffi.new("size_t *")
    _check(
        _lib.kvc_state_compose(p, arr.size, _ptr(sel, "int32_t"), *sel.shape, ffi.NULL, 0, size), "kvc_state_compose"
    )
    out = np.empty(size[0], dtype=np.uint8)
    _check(
        _lib.kvc_state_compose(p, arr.size, _ptr(sel, "int32_t"), *sel.shape, _ptr(out, "uint8_t"), out.size, size),
        "kvc_state_compose",
    )
    return out.tobytes()


def state_norms(data: bytes, part: str, n_head_kv: int) -> np.ndarray:
    """L2 norms of every (layer, kv head, cell) key (``part="k"``) or value (``"v"``) vector."""
    info = state_parse(data)
    arr, p = _buf(data)
    out = np.empty((info["n_layer"], n_head_kv, info["n_cells"]), dtype=np.float32)
    _check(_lib.kvc_state_norms(p, arr.size, _part(part), n_head_kv, _ptr(out, "float"), out.size), "kvc_state_norms")
    return out


# ---- live contexts -------------------------------------------------------------------------
def context_state_info(ctx, seq_id: int = 0) -> dict:
    info = ffi.new("kvc_state_info *")
    c = _ctx_ptr(ctx)
    _check(_lib.kvc_context_state_info(c, seq_id, info, ffi.NULL, 0), "kvc_context_state_info")
    positions = np.empty(max(1, info.n_cells), dtype=np.int32)
    _check(
        _lib.kvc_context_state_info(c, seq_id, info, _ptr(positions, "int32_t"), positions.size),
        "kvc_context_state_info",
    )
    return _info_dict(info, positions)


def context_norms(ctx, part: str, n_layer: int, n_head_kv: int, n_cells: int, seq_id: int = 0) -> np.ndarray:
    """:func:`state_norms` of sequence ``seq_id`` of a live context."""
    out = np.empty((n_layer, n_head_kv, n_cells), dtype=np.float32)
    _check(
        _lib.kvc_context_norms(_ctx_ptr(ctx), seq_id, _part(part), n_head_kv, _ptr(out, "float"), out.size),
        "kvc_context_norms",
    )
    return out


def _refit(refit: Optional[Tuple[Capture, float]]):
    """``(capture of reference queries, ridge)`` as a ``kvc_refit *`` (NULL: no value refit)."""
    if refit is None:
        return ffi.NULL
    capture, ridge = refit
    return ffi.new("kvc_refit *", {"queries": capture.handle, "ridge": float(ridge)})


def context_compose(
    ctx,
    selection: np.ndarray,
    expected_cells: int = 0,
    seq_id: int = 0,
    refit: Optional[Tuple[Capture, float]] = None,
) -> dict:
    """Rewrite sequence ``seq_id`` of a live context (its values refit over ``refit``'s reference queries
    with that ridge, see ``kvc_refit``); on failure it is restored and this raises."""
    sel = _selection(selection)
    res = ffi.new("kvc_compose_result *")
    _check(
        _lib.kvc_context_compose(
            _ctx_ptr(ctx), seq_id, _ptr(sel, "int32_t"), *sel.shape, int(expected_cells), _refit(refit), res
        ),
        "kvc_context_compose",
    )
    return _fields(res)


def context_compose_tensors(
    ctx,
    capture: Capture,
    positions: np.ndarray,
    selection: np.ndarray,
    seq_id: int = 0,
    refit: Optional[Tuple[Capture, float]] = None,
) -> dict:
    """Rewrite sequence ``seq_id``, held in cache cells ``[0, len(positions))`` at ``positions``, from the
    cache tensors ``capture`` found (no copy of the whole sequence). :class:`UnsupportedCacheError`: the
    cache is untouched (use :func:`context_compose`); :class:`LlamaRefusedError`: the sequence was removed."""
    sel = _selection(selection)
    pos = np.ascontiguousarray(positions, dtype=np.int32)
    if pos.ndim != 1:
        raise ValueError(f"positions must be one-dimensional, got shape {pos.shape}")
    res = ffi.new("kvc_compose_result *")
    _check(
        _lib.kvc_context_compose_tensors(
            _ctx_ptr(ctx),
            capture.handle,
            seq_id,
            _ptr(pos, "int32_t"),
            pos.size,
            _ptr(sel, "int32_t"),
            *sel.shape,
            _refit(refit),
            res,
        ),
        "kvc_context_compose_tensors",
    )
    return _fields(res)
