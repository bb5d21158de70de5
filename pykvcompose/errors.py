"""The exceptions users catch, importable from ``pykvcompose``: failures the native core reports (each with
its ``kvc_status`` code) and session files that cannot be loaded. Bad arguments raise ``ValueError``."""

from __future__ import annotations


class NativeError(RuntimeError):
    """A failure reported by the native core; ``status`` holds the ``kvc_status`` code."""

    def __init__(self, status: int, function: str, detail: str = "") -> None:
        self.status = status
        super().__init__(f"{function}: {detail}" if detail else function)


class InvalidArgumentError(NativeError, ValueError):
    """The native core refused an argument (``KVC_ERR_INVALID_ARGUMENT``)."""


class CorruptStateError(NativeError, ValueError):
    """A state buffer is truncated or inconsistent (``KVC_ERR_CORRUPT_STATE``)."""


class UnsupportedCacheError(NativeError, NotImplementedError):
    """A valid cache this library cannot compress: its type or layout (``KVC_ERR_UNSUPPORTED``)."""


class NativeMemoryError(NativeError, MemoryError):
    """The native core ran out of memory (``KVC_ERR_OUT_OF_MEMORY``)."""


class LlamaRefusedError(NativeError):
    """llama.cpp refused a call (``KVC_ERR_LLAMA``); the message says what became of the cache."""


class SessionError(ValueError):
    """A session file that cannot be loaded here: corrupt, truncated, or saved for another model or cache."""
