"""Presses: one compression method per dataclass."""

from .base_press import BasePress
from .kvcompose_press import KVComposePress

__all__ = ["BasePress", "KVComposePress"]
