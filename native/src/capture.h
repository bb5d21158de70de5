// The attention capture's state, shared by capture.cpp (which fills it from the graph and reads the
// cache tensors it found) and context.cpp (which rewrites the cache through those tensors).
#pragma once

#include "backend_reduce.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct ggml_tensor;

struct kvc_capture {
    bool    active  = false;
    int32_t n_layer = 0;
    int32_t n_head  = 0;
    int32_t n_keys  = 0;

    std::vector<float>   max;        // [n_layer, n_head, n_keys]: running max over probe queries
    std::vector<double>  sum;        // [n_layer, n_head, n_keys]: running sum, for the mean
    std::vector<int64_t> n_queries;  // [n_layer]
    // The first head_rows probe query rows of each layer (kvc_capture_set_head_rows) pooled apart as well:
    // [n_layer, n_head, n_keys] like max and sum, empty while head_rows is 0
    int32_t head_rows = 0;
    std::vector<float>   head_max;
    std::vector<double>  head_sum;
    std::vector<int64_t> head_queries;  // [n_layer]
    // Only the first pooled_rows probe query rows of each layer are pooled (kvc_capture_set_pooled_rows);
    // 0: all of them
    int32_t pooled_rows = 0;
    std::vector<float>   staging;    // host copy of tensors that live on a device buffer
    std::vector<float>   keys;       // recomputed attention: the layer's keys as f32 [n_head_kv, n_kv, D]
    bool    recompute = false;       // recompute kq_soft_max from q and k instead of reading it
    int32_t reduce_where = 0;        // KVC_REDUCE_BACKEND or KVC_REDUCE_HOST
    int32_t n_threads = 0;           // for a CPU backend's reduction; 0: kvc::max_threads()
    std::unique_ptr<kvc::BackendReducer> reducer;  // made on the first backend reduction
    std::string fallback;            // why the backend did not reduce (the first reason), "" if it did
    uint64_t host_bytes = 0;         // tensor bytes the capture read on the host since begin
    // The KV cache tensors ("cache_k_l{il}", "cache_v_l{il}") behind each layer's attention, found in
    // the graph while capturing; they live as long as the context. Kept after the capture ends.
    std::vector<const ggml_tensor *> k_cache, v_cache;  // [n_layer], nullptr: not seen
    std::vector<int8_t>  v_trans;    // [n_layer]: 1 if the layer reads V transposed, -1 not seen
    // [n_keys]: probe query rows of layer 0 whose attention mask shows cell j (the layout check of
    // kvc_context_compose_tensors: which cells held the sequence, at which positions)
    std::vector<int32_t> visible;
    // Reference queries (kvc_capture_set_queries): every query_every-th probe query row, up to
    // query_max per layer, [n_stored, n_head, head_dim] f32 after RoPE, with the layer's KQ scale.
    int32_t query_every = 0, query_max = 0;  // 0: none kept
    std::vector<std::vector<float>> queries;  // [n_layer]
    std::vector<int32_t> query_dim;           // [n_layer], 0: none seen
    std::vector<float>   query_scale;         // [n_layer]
    std::string          queries_unusable;    // why some layer's queries could not be kept ("": none)
    std::string          error;      // first problem seen by the callback (it cannot return one)
    // Flash-attention nodes whose CPU kernel the capture skips because the reduction computes their output
    // (BackendReducer::writes_output): their keys' view cut to one key when the node is asked about, the
    // count restored when it is observed, or at the latest when the capture ends.
    struct SkippedKernel {
        const ggml_tensor * node;
        ggml_tensor * keys;
        int64_t n_kv;
    };
    std::vector<SkippedKernel> skipped;
    int64_t n_outputs = 0;  // outputs the reduction wrote in place of a skipped kernel since begin
};

namespace kvc {
struct ParsedState;

// Of a ubatch's n_tok rows, how many fall within the first `limit` rows of a layer that has seen `seen` already.
inline int64_t rows_within(int64_t limit, int64_t seen, int64_t n_tok) {
    const int64_t left = limit - seen;
    return left <= 0 ? 0 : (left < n_tok ? left : n_tok);
}

// How many of a ubatch's n_tok query rows in layer il are among the capture's head rows (the first
// head_rows of the layer since kvc_capture_begin): rows [0, that) of the ubatch. Call before counting
// the ubatch into n_queries[il].
inline int64_t head_rows_of(const kvc_capture & cap, int32_t il, int64_t n_tok) {
    return cap.head_max.empty() ? 0 : rows_within(cap.head_rows, cap.n_queries[il], n_tok);
}

// How many of a ubatch's n_tok query rows in layer il the capture pools: rows [0, that) of the ubatch, all
// of them unless kvc_capture_set_pooled_rows limits the layer's rows since kvc_capture_begin. Call before
// counting the ubatch into n_queries[il] (which counts pooled rows only).
inline int64_t pooled_rows_of(const kvc_capture & cap, int32_t il, int64_t n_tok) {
    return cap.pooled_rows <= 0 ? n_tok : rows_within(cap.pooled_rows, cap.n_queries[il], n_tok);
}

// Fold n probabilities into a running max and sum (one query row, or one pooled block's (max, sum)).
inline void fold_max_sum(float * mx, double * sm, const float * row_max, const float * row_sum, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
        mx[j] = std::max(mx[j], row_max[j]);
        sm[j] += row_sum[j];
    }
}

// A ParsedState over cache cells [0, n_cells) of the capture's cache tensors: what
// llama_state_seq_get_data would write for a sequence held in exactly those cells. part: KVC_PART_K,
// KVC_PART_V, or -1 for both. Rows on device buffers are copied into `stages` (one per layer and part).
int32_t capture_rows(const kvc_capture & cap, int32_t part, int32_t seq_id, const int32_t * positions,
                     uint32_t n_cells, ParsedState & st, std::vector<std::vector<uint8_t>> & stages);
}  // namespace kvc
