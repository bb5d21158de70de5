"""Benchmark statistics against values computed independently (scipy-free closed forms and loops)."""

import math

import pytest

from kvbench.stats import count_with_interval, mcnemar_exact, wilson_interval


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [
        (3, 10, 0.1078, 0.6032),  # textbook values (Wilson 1927 / Newcombe 1998, table I style)
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_contains_the_estimate_and_shrinks_with_n():
    for n in (5, 20, 80):
        lo, hi = wilson_interval(n // 4, n)
        assert lo <= (n // 4) / n <= hi
    assert (lambda a, b: b[1] - b[0] < a[1] - a[0])(wilson_interval(5, 20), wilson_interval(20, 80))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_is_a_binomial_test_of_discordant_pairs():
    a = [True] * 7 + [False] * 3 + [True] * 5
    b = [False] * 7 + [True] * 1 + [False] * 2 + [True] * 5  # 7 only-a, 1 only-b, 5 both, 2 neither
    expected = 2 * sum(math.comb(8, i) for i in range(2)) / 2**8
    assert mcnemar_exact(a, b) == pytest.approx(expected)
    assert mcnemar_exact(b, a) == pytest.approx(expected)
    assert mcnemar_exact(a, a) == 1.0
    assert mcnemar_exact([True, False], [False, True]) == 1.0  # balanced discordance: no evidence
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_exact([True], [True, False])


def test_count_with_interval_text():
    assert count_with_interval(3, 10) == "3/10 (11-60%)"


def test_the_benchmarks_warn_when_the_installed_package_is_not_the_source_tree(tmp_path, monkeypatch):
    """A bench script imports the installed pykvcompose: after an edit without `make install` it would measure the
    old code and say nothing (it once did). kvbench names the files that differ."""
    import pathlib
    import shutil
    import warnings

    import kvbench
    import pykvcompose

    source, installed = tmp_path / "src", tmp_path / "site"
    for root in (source, installed):
        (root / "presses").mkdir(parents=True)
        (root / "same.py").write_text("x = 1\n")
        (root / "presses" / "p.py").write_text("y = 2\n")
    assert kvbench.stale_sources(source, installed) == []
    (source / "presses" / "p.py").write_text("y = 3\n")
    (source / "new.py").write_text("z = 1\n")
    assert kvbench.stale_sources(source, installed) == ["new.py", str(pathlib.Path("presses") / "p.py")]

    # the real check on this checkout: an installed copy made stale by one edited file is named
    tree = pathlib.Path(kvbench.__file__).resolve().parents[2] / "pykvcompose"
    copy = tmp_path / "pykvcompose"
    shutil.copytree(tree, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pykvcompose, "__file__", str(copy / "__init__.py"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kvbench.warn_if_installed_copy_is_stale()  # the same text: silent
    (copy / "streaming.py").write_text("# an older streaming module\n")
    with pytest.warns(UserWarning, match=r"differs from the source tree in streaming\.py: run `make install`"):
        kvbench.warn_if_installed_copy_is_stale()
