"""What the project's own benchmarks share (not part of the installed package): the press-by-ratio grid
(``runner``, ``tasks``, ``metrics``, ``report``; run by ``bench/grid.py``), needle haystacks, counts with
intervals and paired tests (``stats``), and the server's request mix (``server_load``).

Scripts in ``bench/`` import it as ``kvbench`` (Python puts the script's folder first on ``sys.path``);
the tests find it through pytest's ``pythonpath``."""

import pathlib
import re
import warnings
from typing import List


def stale_sources(source: pathlib.Path, installed: pathlib.Path) -> List[str]:
    """The ``.py`` files of the package's source tree ``source`` that the installed copy ``installed`` lacks or
    holds with other text, relative to ``source``, sorted."""
    stale = []
    for path in sorted(source.rglob("*.py")):
        rel = path.relative_to(source)
        copy = installed / rel
        if not copy.is_file() or copy.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    return stale


def warn_if_installed_copy_is_stale() -> None:
    """Warn when the benchmarks would measure an installed pykvcompose that is not the source tree next to them:
    ``make install`` reinstalls it (the Makefile's bench targets do), or ``PYTHONPATH=.`` runs the tree itself."""
    import pykvcompose

    installed = pathlib.Path(pykvcompose.__file__).resolve().parent
    source = pathlib.Path(__file__).resolve().parents[2] / "pykvcompose"
    if not source.is_dir() or installed == source.resolve():
        return
    stale = stale_sources(source, installed)
    if stale:
        shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        warnings.warn(
            f"the benchmarks run the installed pykvcompose at {installed}, which differs from the source tree in "
            f"{shown}: run `make install` first, or set PYTHONPATH to the project root to measure the tree",
            stacklevel=2,
        )


warn_if_installed_copy_is_stale()


def one_line(text: str) -> bool:
    """A short answer is complete: some text and then a blank line (``pykvcompose.demo.answer``'s ``stop``)."""
    return re.search(r"\w.*\n\s*\n", text, re.S) is not None
