"""The demo's table, on a short document."""

import pytest

from pykvcompose import KVComposePress, Llama
from pykvcompose.demo import answer, format_table, passkey_prompt, run_demo

pytestmark = pytest.mark.model


def test_demo_rows_and_table():
    rows = run_demo(n_tokens=400, ratios=(0.5,), depth=0.3, quiet=True, stream_ctx=256, published_ratios=(0.75,))
    assert [r["method"] for r in rows] == [
        "full cache",
        "KVCompose 0.5",
        "KVCompose 0.75, as published",
        "KVCompose streamed, n_ctx=256",
    ]
    full, comp, published, streamed = rows
    # the default's lookahead decodes a few tokens where the published probe prefills the document again
    assert published["cells"] < comp["cells"] and 0 < comp["compress_s"] < published["compress_s"]
    # the streamed row reports the cells llama.cpp allocated (n_ctx), fewer than the document needs
    assert streamed["cells"] == 256 < full["cells"]
    assert streamed["kv_mib"] == pytest.approx(comp["kv_mib"] / comp["cells"] * 256)
    assert streamed["prefill_s"] > 0 and streamed["compress_s"] > 0
    assert full["correct"], full  # a 400-token haystack is easy for the full cache
    assert comp["cells"] < full["cells"] and comp["kv_mib"] < full["kv_mib"]
    assert comp["compress_s"] > 0 and full["compress_s"] == 0
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| method | cells | KV MiB |")
    assert len(table.splitlines()) == 6
    assert [r["method"] for r in run_demo(n_tokens=300, ratios=(), quiet=True, stream_ctx=0, published_ratios=())] == [
        "full cache"
    ]


def test_a_streamed_answer_counts_the_probe_before_its_second_token_apart(model_path):
    """A streamed prompt that ends near a full cache probes the cells no question ranked yet (its last chunk)
    before the second token is decoded, so that a later compression can rank them: ``answer`` returns that time
    apart (the demo's compress column), not as decoding."""
    llm = Llama(model_path, n_ctx=256, n_batch=512, verbose=False, kv_compress=KVComposePress(0.75), kv_room="fill")
    try:
        prompt = passkey_prompt(lambda s: llm.tokenize(s.encode(), add_bos=False), 700, 0.3, 73918)
        res = answer(llm, llm.tokenize(prompt.encode()), max_tokens=6)
        assert res["stream_seconds_at_first_token"]["probe"] == 0  # the question ranked every compression
        assert res["late_probe_seconds"] > 0
        assert res["late_probe_seconds"] == pytest.approx(llm.kv_stream_seconds["probe"])
    finally:
        llm.close()
