"""The demo's table, on a short document."""

from pykvcompose.demo import format_table, run_demo


def test_demo_rows_and_table():
    rows = run_demo(n_tokens=400, ratios=(0.5,), depth=0.3, quiet=True)
    assert [r["method"] for r in rows] == ["full cache", "KVCompose 0.5"]
    full, comp = rows
    assert full["correct"], full  # a 400-token haystack is easy for the full cache
    assert comp["cells"] < full["cells"] and comp["kv_mib"] < full["kv_mib"]
    assert comp["compress_s"] > 0 and full["compress_s"] == 0
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| method | cells | KV MiB |")
    assert len(table.splitlines()) == 4
