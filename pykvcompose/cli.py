"""The ``pykvcompose`` command."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = {
    "demo": "a long document with a planted fact, answered with the full cache and with KVCompose",
    "run": "answer --question about a --file, however long, on a compressed cache",
    "chat": "interactive chat on a compressed cache (sessions can be saved and continued)",
    "serve": "OpenAI-compatible server (llama-cpp-python's) with --kv-compress NAME:RATIO",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pykvcompose COMMAND [options]\n\ncommands:")
        for name, what in COMMANDS.items():
            print(f"  {name:8s} {what}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd in ("run", "chat", "serve"):
        from . import commands

        return {"run": commands.run_main, "chat": commands.chat_main, "serve": commands.serve_main}[cmd](rest)
    print(f"pykvcompose: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
