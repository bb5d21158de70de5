"""A numpy view of one single-stream sequence state (``llama_state_seq_get_data``'s layout, f16/f32 K and V),
for the merge screen: the product reads and writes states in C++ (native/src/state.cpp)."""

import numpy as np

F16, F32 = 1, 0
DTYPES = {F16: np.float16, F32: np.float32}


def parse(buf: bytearray):
    """Views into ``buf``: (positions, K, V, v_trans) with K[l] (cells, n_embd_k) and V[l] (cells, n_embd_v),
    V[l] a transposed view when the state stores V transposed (flash attention off)."""
    mv = memoryview(buf)
    at = 0

    def take(dtype, count=1):
        nonlocal at
        a = np.frombuffer(mv, dtype=dtype, count=count, offset=at)
        at += a.nbytes
        return a

    magic, _seq = take(np.uint32)[0], take(np.int32)[0]
    assert magic == 0xAF143CD8, hex(magic)
    n_stream = take(np.uint32)[0]
    pos = None
    for _ in range(n_stream):
        cells = int(take(np.uint32)[0])
        if cells == 0:
            continue
        assert pos is None, "one stream"
        meta = take(np.int32, 3 * cells).reshape(cells, 3)
        assert (meta[:, 1] == 1).all()
        pos = meta[:, 0].copy()
        v_trans, n_layer = (int(x) for x in take(np.uint32, 2))
        K, V = [], []
        for _ in range(n_layer):
            t = int(take(np.int32)[0])
            row = int(take(np.uint64)[0])
            dt = DTYPES[t]
            K.append(take(dt, cells * row // np.dtype(dt).itemsize).reshape(cells, -1))
        for _ in range(n_layer):
            t = int(take(np.int32)[0])
            dt = DTYPES[t]
            if v_trans:
                _el, n_embd = (int(x) for x in take(np.uint32, 2))
                V.append(take(dt, n_embd * cells).reshape(n_embd, cells).T)
            else:
                row = int(take(np.uint64)[0])
                V.append(take(dt, cells * row // np.dtype(dt).itemsize).reshape(cells, -1))
    assert at == len(buf), (at, len(buf))
    return pos, K, V, bool(v_trans)
