"""The probe's attention reduced on the backend that holds the tensors (issue 31): a ggml graph pools
llama.cpp's kq_soft_max in place, or recomputes the probabilities under flash attention from the
node's q and k (mul_mat -> softmax, on the CPU one op with the pooling) in blocks of queries, so only
[n_head, n_kv] floats per layer and ubatch reach the host. The host loops (kvc_capture_set_reduce(HOST))
are the oracle."""

import warnings

import llama_cpp
import numpy as np
import pytest

from pykvcompose import KVComposePress, Llama, probing

pytestmark = pytest.mark.model

F16, Q8_0, Q4_0 = llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q4_0
# score tolerance: ggml quantizes the queries for quantized keys with its SIMD code, the host loop
# with the reference code (a few probabilities in 10^5 differ by up to ~2e-3 with q4_0 keys)
CASES = [(False, F16, 1e-5), (True, F16, 1e-5), (True, Q8_0, 1e-3), (True, Q4_0, 5e-3)]
IDS = ["softmax-f16", "flash-f16", "flash-q8_0", "flash-q4_0"]
PRESS = KVComposePress(0.5, scoring="reconstruct", min_tokens=16)


def jaccard(sel_a: np.ndarray, sel_b: np.ndarray) -> np.ndarray:
    """Per (layer, kv head) Jaccard index of two selections [layers, kv_heads, cells]."""
    a, b = sel_a.reshape(-1, sel_a.shape[-1]), sel_b.reshape(-1, sel_b.shape[-1])
    return np.array([len(np.intersect1d(x, y)) / len(np.union1d(x, y)) for x, y in zip(a, b)])


def compress_each_way(model_path, tokens, flash_attn, type_k, ways):
    """Selections, head scores, host bytes and fallback of compress_context(tokens) reduced each way,
    on one context (the same activations)."""
    m = Llama(
        model_path,
        n_ctx=1024,
        flash_attn=flash_attn,
        type_k=type_k,
        type_v=type_k if flash_attn else F16,
        verbose=False,
    )
    runs, visible = [], []
    try:
        for where in ways:
            m._kv_capture.set_reduce(where)
            m.compress_context(tokens, PRESS)
            cap = m._kv_capture
            runs.append((m.kv_selection.copy(), m.kv_head_scores.copy(), cap.host_bytes, cap.fallback))
            visible.append(cap.visibility())
    finally:
        m.close()
    # which cells layer 0's mask showed to how many probe queries: the same whichever way reduced it
    for v in visible[1:]:
        np.testing.assert_array_equal(v, visible[0])
    return runs


@pytest.mark.parametrize("flash_attn,type_k,atol", CASES, ids=IDS)
def test_backend_reduction_selects_what_the_host_reduction_selects(
    model_path, prompt_tokens, flash_attn, type_k, atol, monkeypatch
):
    # the backend computes the flash node's output in place of ggml's kernel (test_flash_attention.py): here the
    # kernel runs, so that both reductions see the same activations
    monkeypatch.setenv("KVC_KEEP_FLASH_KERNEL", "1")
    ctx = prompt_tokens[:-1]
    (sel_h, hs_h, bytes_h, fb_h), (sel_b, hs_b, bytes_b, fb_b) = compress_each_way(
        model_path, ctx, flash_attn, type_k, ["host", "backend"]
    )
    assert fb_b == "" and fb_h == ""
    jac = jaccard(sel_h, sel_b)
    assert jac.min() >= 0.99, jac.min()
    np.testing.assert_allclose(hs_b, hs_h, atol=atol)
    # the host receives (max, sum) per (layer, query head, key) and layer 0's visible counts per key,
    # per ubatch: the reconstruct probe is one ubatch of len(ctx) queries over the 1024 cells' window
    n_layer, n_head = 30, 9
    n_kv_max = 1024
    assert bytes_b <= 4 * (2 * n_layer * n_head * n_kv_max + n_kv_max)
    assert bytes_h > 20 * bytes_b  # the host path reads probabilities or q, k and mask


def test_blocks_of_queries_fold_to_one_pass(model_path, prompt_tokens, monkeypatch):
    """Under flash attention the probabilities are recomputed a block of queries at a time; blocks of
    three queries give the scores one block gives (max and sum folded in the graph). ggml's kernel computes
    the layers' outputs, so that both see the same activations (the output written in blocks: test_native)."""
    monkeypatch.setenv("KVC_KEEP_FLASH_KERNEL", "1")
    ctx = prompt_tokens[:-1]
    ((_, whole, _, _),) = compress_each_way(model_path, ctx, True, F16, ["backend"])
    monkeypatch.setenv("KVC_REDUCE_BLOCK_BYTES", str(3 * 1024 * 9 * 4))
    ((_, blocks, _, fb),) = compress_each_way(model_path, ctx, True, F16, ["backend"])
    assert fb == ""
    np.testing.assert_allclose(blocks, whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["softmax", "flash"])
def test_the_portable_graph_gives_the_cpu_pooling(model_path, prompt_tokens, flash_attn, monkeypatch):
    """The graph GPUs run (POOL_2D, CONCAT, ADD instead of the CPU's threaded custom op), made to run on
    the CPU by denying the custom op, in several blocks: the same scores."""
    ctx = prompt_tokens[:-1]
    monkeypatch.setenv("KVC_KEEP_FLASH_KERNEL", "1")  # the portable graph writes no output: same activations
    ((sel_c, custom, _, _),) = compress_each_way(model_path, ctx, flash_attn, F16, ["backend"])
    monkeypatch.setenv("KVC_REDUCE_DENY_OP", "CUSTOM")
    monkeypatch.setenv("KVC_REDUCE_BLOCK_BYTES", str(100 * 1024 * 9 * 4))
    ((sel_p, portable, bytes_p, fb),) = compress_each_way(model_path, ctx, flash_attn, F16, ["backend"])
    assert fb == "" and bytes_p <= 4 * (2 * 30 * 9 * 1024 + 1024)
    np.testing.assert_allclose(portable, custom, rtol=1e-4, atol=1e-6)
    assert jaccard(sel_c, sel_p).min() >= 0.99


def test_a_missing_op_falls_back_to_the_host_with_one_warning(model_path, prompt_tokens, monkeypatch):
    ctx = prompt_tokens[:-1]
    ((sel_h, hs_h, _, _),) = compress_each_way(model_path, ctx, True, F16, ["host"])
    monkeypatch.setenv("KVC_REDUCE_DENY_OP", "MUL_MAT")
    m = Llama(model_path, n_ctx=1024, flash_attn=True, verbose=False)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(2):
                m.compress_context(ctx, PRESS)
        assert m._kv_capture.fallback == "the CPU backend lacks MUL_MAT"
        ours = [w for w in seen if "reduced on the host" in str(w.message)]
        assert len(ours) == 1 and "MUL_MAT" in str(ours[0].message) and ours[0].category is RuntimeWarning
        # the host computed the same scores: nothing wrong, nothing half-folded
        np.testing.assert_allclose(m.kv_head_scores, hs_h, atol=1e-6)
        np.testing.assert_array_equal(m.kv_selection, sel_h)
    finally:
        m.close()


def test_reduction_place_is_checked(model_path):
    m = Llama(model_path, n_ctx=256, verbose=False)
    try:
        with pytest.raises(ValueError, match="unknown reduction place 'gpu'"):
            m._kv_capture.set_reduce("gpu")
    finally:
        m.close()


@pytest.mark.parametrize("where", ["backend", "portable", "host"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["softmax", "flash"])
def test_head_rows_and_pooled_rows_score_what_those_rows_score_alone(
    model_path, prompt_tokens, flash_attn, where, monkeypatch
):
    """The capture's head rows (a question whose batch also carries the drafts it checks, which a failed check
    discards) are pooled apart: over 40 rows in three ubatches, the first 20 score what those 20 rows score
    captured alone (causal rows never see the later ones), and the whole capture what it scores without them
    (to float rounding: the two ranges are summed apart). Pooled rows (a batch padded up to a kernel's tile):
    with only the first 20 of the 40 pooled (all of one ubatch, part of the next, none of the last), the capture
    scores what those 20 score alone. "portable": the graph GPUs run, on the CPU."""
    if where == "portable":
        monkeypatch.setenv("KVC_REDUCE_DENY_OP", "CUSTOM")
        monkeypatch.setenv("KVC_REDUCE_BLOCK_BYTES", str(3 * 512 * 9 * 4))  # blocks of 3 queries
    m = Llama(model_path, n_ctx=512, n_batch=16, flash_attn=flash_attn, verbose=False)
    try:
        m._kv_capture.set_reduce("host" if where == "host" else "backend")
        engine = m._engine
        context, rows = prompt_tokens[:200], prompt_tokens[200:240]
        m.eval(context)
        base = cells = len(context)
        alone = engine.captured(lambda: probing.decode_removed(engine, rows[:20], base), cells)
        whole = engine.captured(lambda: probing.decode_removed(engine, rows, base), cells)
        split = engine.captured(lambda: probing.decode_removed(engine, rows, base), cells, head_rows=20)
        head = engine.capture_scores(head=True)
        padded = engine.captured(lambda: probing.decode_removed(engine, rows, base), cells, pooled_rows=20)
        assert m._kv_capture.fallback == ""
        for got, want in zip(head, alone):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        for got, want in zip(padded, alone):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert all(m._kv_capture.n_queries(il) == 20 for il in range(engine.shape.n_model_layers))
        np.testing.assert_array_equal(m._kv_capture.visibility()[:cells], 20)  # layer 0's 20 rows see every cell
        np.testing.assert_array_equal(split[0], whole[0])  # the max: whatever the order
        np.testing.assert_allclose(split[1], whole[1], rtol=1e-6, atol=1e-9)  # sums in another order
        assert not np.allclose(head[1], whole[1], atol=1e-4)  # the last 20 rows weigh in the whole mean
        # a capture begun without head rows keeps none
        engine.captured(lambda: probing.decode_removed(engine, rows[:4], base), cells)
        with pytest.raises(Exception, match="kept no head rows"):
            engine.capture_scores(head=True)
    finally:
        m.close()
