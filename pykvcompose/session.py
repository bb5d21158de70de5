"""Sessions: a conversation's cache, token history, press and model fingerprint saved to a file and
loaded back (``Llama.save_session``/``load_session``), with every check a loaded file must pass.

File layout (little endian)::

    b"PYKVCSES"  u32 format version  u64 header bytes  header (UTF-8 JSON)
    u64 state bytes  state (llama_state_seq_get_data of sequence 0)
    (version 2) u64 score bytes  persisted cell scores: float32 [2 (max, mean), layers, heads, cells]
    sha256 of everything before (32 bytes)

Version 1 files (no scores) still load: their cells are scored again when the cache next fills.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import struct
from typing import Any, Dict, Optional, Tuple, Union

import llama_cpp
import numpy as np

from . import _native
from .errors import SessionError
from .presses import PRESSES, DecodingPress, PrefillDecodingPress

MAGIC = b"PYKVCSES"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_DIGEST = 32
_PRESS_CLASSES = {cls.__name__: cls for cls in (*PRESSES.values(), DecodingPress, PrefillDecodingPress)}
#: Fields earlier versions saved: removed as no gain (a file that holds their old default loads as before), or
#: moved to the Llama's StreamPolicy (None: dropped whatever their value).
_RETIRED_FIELDS = {
    "KVComposePress": {
        "head_consensus": 0.0,
        "starved_layers": "own",
        "span": 1,
        "protect_tail": 0,
        "refit_values": False,
        "question_tail": None,
        "question_consensus": None,
    }
}


def press_to_dict(press) -> Any:
    """A press as JSON-able data (``{"type": class name, field: value, ...}``, nested presses too)."""
    if press is None:
        return None
    data = {"type": type(press).__name__}
    for f in dataclasses.fields(press):
        value = getattr(press, f.name)
        data[f.name] = press_to_dict(value) if dataclasses.is_dataclass(value) else value
    return data


def press_from_dict(data: Any):
    """The press ``press_to_dict`` described; SessionError for anything else."""
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("type") not in _PRESS_CLASSES:
        raise SessionError(f"unknown press {data!r} in the session file")
    cls = _PRESS_CLASSES[data["type"]]
    kwargs = {k: press_from_dict(v) if isinstance(v, dict) else v for k, v in data.items() if k != "type"}
    for name, default in _RETIRED_FIELDS.get(cls.__name__, {}).items():
        if name in kwargs and kwargs.pop(name) != default and default is not None:
            raise SessionError(
                f"the session file's {cls.__name__} sets {name}, which this version no longer has (docs/ablations.md)"
            )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SessionError(f"invalid {cls.__name__} in the session file: {e}") from None


def model_fingerprint(llm) -> str:
    """sha256 of what identifies the weights: GGUF metadata, parameter count, byte size, vocabulary size."""
    model = llm._model.model
    h = hashlib.sha256()
    h.update(json.dumps(sorted(llm.metadata.items())).encode())
    h.update(
        struct.pack("<QQi", llama_cpp.llama_model_n_params(model), llama_cpp.llama_model_size(model), llm.n_vocab())
    )
    return h.hexdigest()


def model_description(llm) -> str:
    buf = llama_cpp.ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llm._model.model, buf, len(buf))
    return buf.value.decode(errors="replace")


def _versions() -> Dict[str, str]:
    from . import __version__

    return {"pykvcompose": __version__, "llama_cpp_python": importlib.metadata.version("llama_cpp_python")}


def write(path: Union[str, os.PathLike], header: Dict[str, Any], state: bytes, scores: bytes = b"") -> int:
    """Write a session file atomically (a temporary file renamed over ``path``); returns its size."""
    head = json.dumps({**header, **_versions()}).encode()
    body = (
        MAGIC
        + struct.pack("<IQ", FORMAT_VERSION, len(head))
        + head
        + struct.pack("<Q", len(state))
        + state
        + struct.pack("<Q", len(scores))
        + scores
    )
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.write(hashlib.sha256(body).digest())
    os.replace(tmp, path)
    return len(body) + _DIGEST


def read(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], bytes]:
    """The header and state of a session file, checked for truncation and corruption."""
    return read_all(path)[:2]


def read_all(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], bytes, bytes]:
    """The header, state and score section (b"" in version 1 files) of a session file."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SessionError(f"cannot read session file {path}: {e}") from None
    return parse_all(data, path)


def parse(data: bytes, path: Union[str, os.PathLike] = "<bytes>") -> Tuple[Dict[str, Any], bytes]:
    """The header and state of the bytes of a session file (``path`` names it in errors)."""
    return parse_all(data, path)[:2]


def parse_all(data: bytes, path: Union[str, os.PathLike] = "<bytes>") -> Tuple[Dict[str, Any], bytes, bytes]:
    """The header, state and score section (b"" in version 1 files) of the bytes of a session file."""

    def corrupt(why: str) -> SessionError:
        return SessionError(f"{path} is not a usable session file: {why}")

    fixed = len(MAGIC) + 12
    if len(data) < fixed or data[: len(MAGIC)] != MAGIC:
        raise corrupt("it does not start with the pykvcompose session signature")
    version, n_head = struct.unpack_from("<IQ", data, len(MAGIC))
    if version not in READABLE_VERSIONS:
        raise corrupt(
            f"format version {version}, this pykvcompose reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if n_head > len(data) - fixed - 8 - _DIGEST:
        raise corrupt("truncated (header)")
    (n_state,) = struct.unpack_from("<Q", data, fixed + n_head)
    end = state_end = fixed + n_head + 8 + n_state
    if version >= 2:
        if state_end + 8 + _DIGEST > len(data):
            raise corrupt("truncated (state)")
        (n_scores,) = struct.unpack_from("<Q", data, state_end)
        end = state_end + 8 + n_scores
    if end + _DIGEST != len(data):
        raise corrupt("truncated" if end + _DIGEST > len(data) else "trailing bytes after the checksum")
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise corrupt("checksum mismatch (the file was modified or damaged)")
    try:
        header = json.loads(data[fixed : fixed + n_head].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not an object")
    return header, data[fixed + n_head + 8 : state_end], data[state_end + 8 : end] if version >= 2 else b""


def check_compatible(llm, header: Dict[str, Any], state: bytes, path) -> Dict[str, Any]:
    """Refuse a session this Llama cannot hold; returns the parsed state info."""
    fingerprint = header.get("model_fingerprint")
    if fingerprint != model_fingerprint(llm):
        raise SessionError(
            f"{path} was saved with another model ({header.get('model_description', '?')}, "
            f"fingerprint {str(fingerprint)[:12]}); this Llama runs {model_description(llm)} "
            f"(fingerprint {model_fingerprint(llm)[:12]})"
        )
    return check_contents(header, state, path, llm.n_vocab(), llm._engine.shape.n_ctx, llm._engine.shape.n_layer)


def check_contents(
    header: Dict[str, Any], state: bytes, path, n_vocab: int, n_ctx: int, n_layer: int
) -> Dict[str, Any]:
    """Refuse a token history and cache state that do not agree with each other or do not fit a cache
    of ``n_ctx`` cells and ``n_layer`` layers; returns the parsed state info."""
    tokens = header.get("tokens")
    n_tokens, done_len, done_cells = (header.get(k) for k in ("n_tokens", "compressed_len", "compressed_cells"))
    ints = (n_tokens, done_len, done_cells)
    if (
        not isinstance(tokens, list)
        or not all(isinstance(v, int) and v >= 0 for v in ints)
        or len(tokens) != n_tokens
        or not all(isinstance(t, int) and 0 <= t < n_vocab for t in tokens)
        or done_len > n_tokens
        or done_cells > done_len
    ):
        raise SessionError(f"{path} has an inconsistent token history")
    if n_tokens == 0:
        if state:
            raise SessionError(f"{path} holds cache cells but no token history")
        return {"n_cells": 0}
    try:
        info = _native.state_parse(state)
    except _native.NativeError as e:
        raise SessionError(f"{path} holds a damaged cache state: {e}") from None
    cells = done_cells + n_tokens - done_len
    if info["n_cells"] != cells or info["pos_max"] != n_tokens - 1:
        raise SessionError(
            f"{path} holds {info['n_cells']} cells up to position {info['pos_max']}, its history "
            f"needs {cells} cells up to position {n_tokens - 1}"
        )
    if info["n_cells"] > n_ctx:
        raise SessionError(f"{path} holds {info['n_cells']} cells; this Llama's cache has n_ctx={n_ctx}")
    if info["n_layer"] != n_layer:
        raise SessionError(f"{path} holds {info['n_layer']} layers, the model has {n_layer}")
    return info


# ---- Llama.save_session / load_session ---------------------------------------------------------
class instance_or_class:
    """A method that receives the instance when called on one and the class when called on the class."""

    def __init__(self, func) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls):
        return functools.partial(self.func, cls if obj is None else obj)


def save(llm, path: Union[str, os.PathLike], metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``Llama.save_session``: write ``llm``'s conversation to ``path``."""
    engine = llm._engine
    conv = engine.conv
    state = engine.seq_bytes()
    header = {
        "model_fingerprint": model_fingerprint(llm),
        "model_description": model_description(llm),
        "model_path": str(llm.model_path),
        "n_ctx": engine.shape.n_ctx,
        "tokens": conv.history(),
        "n_tokens": conv.n_tokens,
        "compressed_len": conv.compressed_len,
        "compressed_cells": conv.compressed_cells,
        "press": press_to_dict(engine.press),
        "metadata": {} if metadata is None else metadata,
        "cell_scores_shape": None,
    }
    scores = b""
    if conv.cell_scores is not None:
        stacked = np.stack([conv.cell_scores["max"], conv.cell_scores["mean"]]).astype("<f4")
        header["cell_scores_shape"] = list(stacked.shape)
        scores = stacked.tobytes()
    n = write(path, header, state, scores)
    return {"path": str(path), "file_bytes": n, "cells": conv.cells, "n_tokens": conv.n_tokens}


def load(llm_or_cls, path: Union[str, os.PathLike], model_path: Optional[str] = None, **kwargs: Any):
    """``Llama.load_session``: a new Llama for the session (called on the class) or ``llm`` continuing it."""
    if isinstance(llm_or_cls, type):
        header, state, scores = read_all(path)  # refuse a bad file before loading a model for it
        kwargs.setdefault("n_ctx", header.get("n_ctx", 2048))
        if "kv_compress" not in kwargs:
            kwargs["kv_compress"] = press_from_dict(header.get("press"))
        llm = llm_or_cls(model_path or header.get("model_path"), **kwargs)
        try:
            load_into(llm, path, header, state, scores, keep_press=True)
        except BaseException:
            llm.close()
            raise
        return llm
    if model_path is not None or kwargs:
        raise TypeError("llm.load_session(path) takes no model arguments; use Llama.load_session(path, ...)")
    load_into(llm_or_cls, path, *read_all(path), keep_press=False)
    return llm_or_cls


def load_into(
    llm, path: Union[str, os.PathLike], header: Dict[str, Any], state: bytes, scores: bytes, keep_press: bool
) -> None:
    """Load a session ``read`` from ``path`` into ``llm``; on any failure ``llm`` is left as it was."""
    check_compatible(llm, header, state, path)
    engine = llm._engine
    conv = engine.conv
    press = engine.press if keep_press else press_from_dict(header.get("press"))
    # what to put back if llama.cpp refuses the cache: the sequence's cells and the bookkeeping
    previous = (
        engine.seq_bytes(),
        conv.history(),
        engine.press,
        conv.compressed_len,
        conv.compressed_cells,
        conv.origin,
        conv.cell_scores,
    )
    try:
        engine.set_press(press)
        if not engine.set_seq_bytes(state):
            raise SessionError(
                f"llama.cpp refused the cache in {path} (saved with another "
                "cache type, flash attention setting or context size?)"
            )
        conv.restored(header["tokens"], header["compressed_len"], header["compressed_cells"], None)
        conv.cell_scores = cell_scores(header, scores, engine.shape.n_layer, engine.shape.n_head, conv.cells, path)
        engine.configure_window()
        llm.kv_session_metadata = header.get("metadata") or {}
    except BaseException:
        seq, tokens, engine.press, done_len, done_cells, origin, scores = previous
        engine.set_seq_bytes(seq)
        conv.restored(tokens, done_len, done_cells, origin, scores)
        engine.configure_window()
        raise


def cell_scores(
    header: Dict[str, Any], data: bytes, n_layer: int, n_head: int, n_cells: int, path
) -> Optional[Dict[str, np.ndarray]]:
    """The persisted cell scores of a session file (None for a version 1 file or a session without any);
    SessionError if they do not fit the cache they come with."""
    shape = header.get("cell_scores_shape")
    if not data and shape is None:
        return None
    ok = (
        isinstance(shape, list)
        and len(shape) == 4
        and all(isinstance(v, int) for v in shape)
        and shape[:3] == [2, n_layer, n_head]
        and 0 < shape[3] <= n_cells
        and len(data) == 4 * int(np.prod(shape))
    )
    if not ok:
        raise SessionError(
            f"{path} holds cell scores of shape {shape} ({len(data)} bytes), which do not fit its "
            f"cache of {n_cells} cells, {n_layer} layers and {n_head} heads"
        )
    scores = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
    return {"max": np.ascontiguousarray(scores[0]), "mean": np.ascontiguousarray(scores[1])}
