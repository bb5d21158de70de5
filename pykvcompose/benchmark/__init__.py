"""The benchmark behind ``pykvcompose bench``: tasks, grid runner, metrics and report."""
