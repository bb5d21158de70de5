// Parsed view of a llama_state_seq_get_data buffer (single sequence, host layout), as written
// by llama_kv_cache::state_write in the vendored llama.cpp:
//   u32 magic, i32 seq_id, u32 n_stream; per stream: u32 cell_count, and if non-zero
//   cell_count x (i32 pos, u32 n_seq_id, n_seq_id x i32 seq_id), u32 v_trans, u32 n_layer,
//   n_layer x K (i32 type, u64 row_size, cell_count rows),
//   n_layer x V (as K) or, transposed, (i32 type, u32 el_size, u32 n_embd, n_embd x cell_count elements).
// iSWA models (llama_kv_cache_iswa) follow it with a second such section, from n_stream on, holding
// the sliding-window layers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvc {

// One layer's K or V rows, wherever they live: in a state buffer or in a cache tensor.
struct TensorRows {
    int32_t  type     = 0;
    uint64_t row_size = 0;  // bytes of one cell's row (K, plain V) or one element (transposed V)
    int64_t  n_embd   = 0;  // elements per cell
    const uint8_t * data = nullptr;  // cell 0's row (K, plain V) or element 0's row of cells (transposed V)
    size_t   stride   = 0;  // bytes from one cell's row to the next (K, plain V) or one element's row to the next
};

struct ParsedState {
    uint32_t magic     = 0;
    int32_t  seq_id    = 0;
    uint32_t n_stream  = 0;
    uint32_t stream    = 0;  // the one stream holding cells
    uint32_t n_cells   = 0;
    std::vector<int32_t> pos;
    std::vector<int32_t> cell_seq;  // the seq id stored with each cell
    uint32_t v_trans   = 0;
    uint32_t n_layer   = 0;
    std::vector<TensorRows> k, v;
    // a second cache after the first (iSWA models: the sliding-window layers), kept as it is
    const uint8_t * tail = nullptr;  // nullptr: none
    size_t   tail_size    = 0;
    uint32_t tail_n_cells = 0;
    uint32_t tail_n_layer = 0;

    uint64_t kv_bytes_per_cell() const;
};

// Returns KVC_OK or a failure status (with kvc_last_error set).
int32_t parse_state(const uint8_t * src, size_t size, ParsedState & out);

// Bytes of a state of n_cells cells with st's layers and types (and st's second cache, if any): what
// llama_state_seq_get_data writes for a sequence of that many cells.
size_t state_size(const ParsedState & st, uint32_t n_cells);

// A state of n_keep cells from st's rows (see kvc_state_compose): sizes it into *dst_size, and writes it
// if dst is not NULL and holds that many bytes. st may describe a buffer or the cache tensors.
int32_t compose_rows(const ParsedState & st, const int32_t * sel, int32_t n_layer, int32_t n_head_kv, int32_t n_keep,
                     uint8_t * dst, size_t dst_capacity, size_t * dst_size);

// Whether rows of `type` convert to f32 here (f32, or ggml to_float traits; a transposed V holds one element
// per row, so only types of block size 1), and the conversion of n elements at src.
bool readable_as_f32(int32_t type, bool transposed);
void to_f32(int32_t type, const uint8_t * src, float * dst, int64_t n);

// L2 norms of st's K or V vectors per (layer, kv head, cell) (see kvc_state_norms); layers over threads.
int32_t row_norms(const ParsedState & st, int32_t part, int32_t n_head_kv, float * out, size_t n_values);

constexpr uint32_t kStateMagic = 0xaf143cd8u;

}  // namespace kvc
