"""The same compression with the cache on a GPU (run where llama-cpp-python has a GPU backend:
`pytest -m gpu`; see the README for CUDA and Metal builds). The capture copies device tensors to
the host (ggml_backend_tensor_get) and the rewrite goes through llama.cpp's state API, which copies
device buffers too, so the results must equal the CPU's up to the backends' rounding."""

import llama_cpp
import numpy as np
import pytest

from pykvcompose import KVComposePress, Llama

from conftest import greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(),
                       reason="this llama-cpp-python build has no GPU backend"),
]


@pytest.mark.parametrize("flash_attn", [False, True])
def test_offloaded_cache_compresses_like_the_cpu(model_path, prompt_tokens, flash_attn):
    press = KVComposePress(0.5, min_tokens=16)
    runs = []
    for n_gpu_layers in (0, -1):
        m = Llama(model_path, n_ctx=1024, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, verbose=False,
                  kv_compress=press)
        out = greedy(m, prompt_tokens, 8)
        runs.append((m.kv_selection.copy(), m.kv_stats["cells_after"], out))
        m.close()
    (sel_cpu, cells_cpu, _), (sel_gpu, cells_gpu, out_gpu) = runs
    assert cells_gpu == cells_cpu and len(out_gpu) == 8
    # different kernels round differently: most kept tokens must agree
    agree = np.mean([len(np.intersect1d(a, b)) / len(a) for a, b in zip(sel_cpu.reshape(-1, cells_cpu),
                                                                       sel_gpu.reshape(-1, cells_gpu))])
    assert agree > 0.9
