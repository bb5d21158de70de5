"""What the project's own benchmarks share (not part of the installed package): the press-by-ratio grid
(``runner``, ``tasks``, ``metrics``, ``report``; run by ``bench/grid.py``), needle haystacks, counts with
intervals and paired tests (``stats``), and the server's request mix (``server_load``).

Scripts in ``bench/`` import it as ``kvbench`` (Python puts the script's folder first on ``sys.path``);
the tests find it through pytest's ``pythonpath``."""

import re


def one_line(text: str) -> bool:
    """A short answer is complete: some text and then a blank line (``pykvcompose.demo.answer``'s ``stop``)."""
    return re.search(r"\w.*\n\s*\n", text, re.S) is not None
