"""The same compression with the cache on a GPU (run where llama-cpp-python has a GPU backend:
`pytest -m gpu`; see the README for CUDA and Metal builds). The capture reduces the attention on the
GPU (a ggml graph; only the reduced scores reach the host) and the rewrite reads the cache tensors'
cells with ggml_backend_tensor_get, so the results must equal the CPU's up to the backends' rounding."""

import llama_cpp
import numpy as np
import pytest

from helpers import greedy, seq_state
from pykvcompose import KVComposePress, Llama, _native

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.model,
    pytest.mark.skipif(
        not llama_cpp.llama_supports_gpu_offload(), reason="this llama-cpp-python build has no GPU backend"
    ),
]


@pytest.mark.parametrize("flash_attn", [False, True])
def test_offloaded_cache_compresses_like_the_cpu(model_path, prompt_tokens, flash_attn):
    press = KVComposePress(0.5, min_tokens=16)
    runs = []
    for n_gpu_layers in (0, -1):
        m = Llama(
            model_path, n_ctx=1024, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, verbose=False, kv_compress=press
        )
        out = greedy(m, prompt_tokens, 8)
        runs.append((m.kv_selection.copy(), m.kv_stats["cells_after"], out))
        m.close()
    (sel_cpu, cells_cpu, _), (sel_gpu, cells_gpu, out_gpu) = runs
    assert cells_gpu == cells_cpu and len(out_gpu) == 8
    # different kernels round differently: most kept tokens must agree
    agree = np.mean(
        [
            len(np.intersect1d(a, b)) / len(a)
            for a, b in zip(sel_cpu.reshape(-1, cells_cpu), sel_gpu.reshape(-1, cells_gpu))
        ]
    )
    assert agree > 0.9


@pytest.mark.parametrize("flash_attn", [False, True])
def test_device_tensor_rewrite_writes_what_the_state_rewrite_writes(model_path, prompt_tokens, flash_attn):
    ctx_tokens = prompt_tokens[:-1]
    n = len(ctx_tokens)
    press = KVComposePress(0.5, min_tokens=16)
    m = Llama(model_path, n_ctx=1024, n_gpu_layers=-1, flash_attn=flash_attn, verbose=False)
    probe = m.kv_probe(ctx_tokens, [press])
    assert probe.in_place
    selection = press.select(press.score(probe), press.n_kept(n), forced=[n - 1])
    before = m.save_state()
    _native.context_compose(m._ctx.ctx, selection, expected_cells=n)
    expected = seq_state(m)
    m.load_state(before)
    _native.context_compose_tensors(m._ctx.ctx, m._kv_capture, np.arange(n, dtype=np.int32), selection)
    assert seq_state(m) == expected
    m.close()


@pytest.mark.parametrize("flash_attn", [False, True])
def test_the_gpu_reduces_what_the_host_reduces(model_path, prompt_tokens, flash_attn):
    """On the GPU's own activations: the graph on the device against the host loops over copies."""
    press = KVComposePress(0.5, scoring="reconstruct", min_tokens=16)
    m = Llama(model_path, n_ctx=1024, n_gpu_layers=-1, flash_attn=flash_attn, verbose=False)
    runs = []
    try:
        for where in ("host", "backend"):
            m._kv_capture.set_reduce(where)
            m.compress_context(prompt_tokens[:-1], press)
            runs.append((m.kv_selection.copy(), m._kv_capture.host_bytes, m._kv_capture.fallback))
    finally:
        m.close()
    (sel_h, bytes_h, _), (sel_b, bytes_b, fallback) = runs
    assert fallback == "", fallback
    assert bytes_b * 20 < bytes_h
    jac = [
        len(np.intersect1d(a, b)) / len(np.union1d(a, b))
        for a, b in zip(sel_h.reshape(-1, sel_h.shape[-1]), sel_b.reshape(-1, sel_b.shape[-1]))
    ]
    assert min(jac) >= 0.99
