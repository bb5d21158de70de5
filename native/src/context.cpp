// Operations on a live llama_context: read the sequence through the host state API (or straight
// from the KV cache tensors the capture found), rewrite it, and put the original back if llama.cpp
// refuses the rewrite.
#include "capture.h"
#include "kvcompose.h"
#include "refit.h"
#include "state.h"
#include "status.h"

#include "llama.h"

#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace {

// A byte buffer that is neither zero-filled nor given back between calls: a fresh allocation of a
// sequence state (tens to hundreds of MB) costs a page fault per 4 kB, measured at 5x the copy
// itself. Each thread keeps one for the state read and one for the composed state; they only grow.
class HostBuffer {
  public:
    void resize(size_t n) {
        if (n > capacity_) {
            data_.reset();  // give the old block back before taking the larger one
            data_.reset(new uint8_t[n]);
            capacity_ = n;
        }
        size_ = n;
    }
    uint8_t * data() { return data_.get(); }
    size_t size() const { return size_; }

  private:
    std::unique_ptr<uint8_t[]> data_;
    size_t size_ = 0;
    size_t capacity_ = 0;
};

HostBuffer & state_buffer() {
    static thread_local HostBuffer b;
    return b;
}

HostBuffer & composed_buffer() {
    static thread_local HostBuffer b;
    return b;
}

int32_t read_sequence(llama_context * ctx, int32_t seq_id, HostBuffer & buf) {
    if (ctx == nullptr) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "context is NULL");
    }
    if (seq_id < 0) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "seq_id must be >= 0");
    }
    const size_t size = llama_state_seq_get_size(ctx, seq_id);
    if (size == 0) {
        return kvc::fail(KVC_ERR_LLAMA, "llama_state_seq_get_size failed");
    }
    buf.resize(size);
    const size_t written = llama_state_seq_get_data(ctx, buf.data(), buf.size(), seq_id);
    if (written != size) {
        return kvc::fail(KVC_ERR_LLAMA, "llama_state_seq_get_data wrote " + std::to_string(written) + " of " +
                                            std::to_string(size) + " bytes");
    }
    return KVC_OK;
}

// kvc_state_compose of an already parsed state (or of the cache tensors) into `after`, its values refit
// when `refit` is given. Nothing is written to the cache here.
int32_t compose_into(const kvc::ParsedState & st, const int32_t * selection, int32_t n_layer, int32_t n_head_kv,
                     int32_t n_keep, const kvc_refit * refit, HostBuffer & after) {
    size_t size = 0;
    int32_t status = kvc::compose_rows(st, selection, n_layer, n_head_kv, n_keep, nullptr, 0, &size);
    if (status != KVC_OK) return status;
    after.resize(size);
    status = kvc::compose_rows(st, selection, n_layer, n_head_kv, n_keep, after.data(), after.size(), &size);
    if (status != KVC_OK || refit == nullptr) return status;
    kvc::ParsedState composed;
    status = kvc::parse_state(after.data(), after.size(), composed);
    if (status != KVC_OK) return status;
    return kvc::refit_values(st, composed, selection, n_layer, n_head_kv, n_keep, *refit);
}

// What composing st into n_keep cells by `selection` ([rows, n_keep]) gave: the composed cells' newest
// position is the newest source position kept.
void describe(const kvc::ParsedState & st, const int32_t * selection, int32_t rows, int32_t n_keep,
              kvc_compose_result * result) {
    if (result == nullptr) return;
    int32_t newest = std::numeric_limits<int32_t>::min();
    for (size_t i = 0; i < static_cast<size_t>(rows) * n_keep; ++i) newest = std::max(newest, st.pos[selection[i]]);
    result->cells_before    = st.n_cells;
    result->cells_after     = static_cast<uint32_t>(n_keep);
    result->kv_bytes_before = st.kv_bytes_per_cell() * st.n_cells;
    result->kv_bytes_after  = st.kv_bytes_per_cell() * static_cast<uint64_t>(n_keep);
    result->pos_max         = newest;
}

int32_t compose_in_place(llama_context * ctx, int32_t seq_id, const int32_t * selection, int32_t n_layer,
                         int32_t n_head_kv, int32_t n_keep, int32_t expected_cells, const kvc_refit * refit,
                         kvc_compose_result * result) {
    HostBuffer & before = state_buffer();
    int32_t status = read_sequence(ctx, seq_id, before);
    if (status != KVC_OK) return status;

    kvc::ParsedState st;
    status = kvc::parse_state(before.data(), before.size(), st);
    if (status != KVC_OK) return status;
    if (expected_cells > 0) {
        if (st.n_cells != static_cast<uint32_t>(expected_cells)) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "the sequence holds " + std::to_string(st.n_cells) +
                                                           " cells, expected " + std::to_string(expected_cells));
        }
        for (uint32_t i = 0; i < st.n_cells; ++i) {
            if (st.pos[i] != static_cast<int32_t>(i)) {
                return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "cell " + std::to_string(i) + " holds position " +
                                                               std::to_string(st.pos[i]) + ", expected positions 0.." +
                                                               std::to_string(expected_cells - 1) + " in order");
            }
        }
    }

    HostBuffer & after = composed_buffer();
    status = compose_into(st, selection, n_layer, n_head_kv, n_keep, refit, after);
    if (status != KVC_OK) return status;

    llama_memory_t mem = llama_get_memory(ctx);
    llama_memory_seq_rm(mem, seq_id, -1, -1);
    if (llama_state_seq_set_data(ctx, after.data(), after.size(), seq_id) != after.size()) {
        // nothing lost: put the exact prior content back
        llama_memory_seq_rm(mem, seq_id, -1, -1);
        if (llama_state_seq_set_data(ctx, before.data(), before.size(), seq_id) != before.size()) {
            return kvc::fail(KVC_ERR_INTERNAL, "llama.cpp refused both the composed and the original sequence state");
        }
        return kvc::fail(KVC_ERR_LLAMA, "llama_state_seq_set_data refused the composed state; the cache was restored");
    }
    describe(st, selection, n_layer * n_head_kv, n_keep, result);
    return KVC_OK;
}

int32_t compose_tensors(llama_context * ctx, const kvc_capture * cap, int32_t seq_id, const int32_t * positions,
                        int32_t n_cells, const int32_t * selection, int32_t n_layer, int32_t n_head_kv,
                        int32_t n_keep, const kvc_refit * refit, kvc_compose_result * result) {
    if (ctx == nullptr || cap == nullptr || positions == nullptr || selection == nullptr) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "context, capture, positions or selection is NULL");
    }
    if (seq_id < 0 || n_cells <= 0) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "seq_id must be >= 0 and n_cells > 0");
    }
    if (cap->active) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "the capture is still active");
    }
    if (llama_n_seq_max(ctx) != 1) {
        return kvc::fail(KVC_ERR_UNSUPPORTED, "the context holds several sequences: their cells can interleave");
    }
    static thread_local std::vector<std::vector<uint8_t>> stages;
    kvc::ParsedState st;
    int32_t status = kvc::capture_rows(*cap, -1, seq_id, positions, static_cast<uint32_t>(n_cells), st, stages);
    if (status != KVC_OK) return status;
    if (n_layer != static_cast<int32_t>(st.n_layer)) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "selection has " + std::to_string(n_layer) +
                                                       " layers, the capture " + std::to_string(st.n_layer));
    }
    // the sequence must be these cells and no other: llama.cpp's size of it must be theirs
    const size_t expected = kvc::state_size(st, st.n_cells);
    const size_t actual = llama_state_seq_get_size(ctx, seq_id);
    if (actual != expected) {
        return kvc::fail(KVC_ERR_UNSUPPORTED, "llama.cpp's state of sequence " + std::to_string(seq_id) + " has " +
                                                  std::to_string(actual) + " bytes, " + std::to_string(n_cells) +
                                                  " cells of the capture's cache tensors " + std::to_string(expected));
    }
    llama_memory_t mem = llama_get_memory(ctx);
    const auto [lo, hi] = std::minmax_element(positions, positions + n_cells);
    if (llama_memory_seq_pos_min(mem, seq_id) != *lo || llama_memory_seq_pos_max(mem, seq_id) != *hi) {
        return kvc::fail(KVC_ERR_UNSUPPORTED, "the sequence's positions are not the ones given");
    }

    HostBuffer & after = composed_buffer();
    status = compose_into(st, selection, n_layer, n_head_kv, n_keep, refit, after);
    if (status != KVC_OK) return status;

    llama_memory_seq_rm(mem, seq_id, -1, -1);
    if (llama_state_seq_set_data(ctx, after.data(), after.size(), seq_id) != after.size()) {
        llama_memory_seq_rm(mem, seq_id, -1, -1);
        return kvc::fail(KVC_ERR_LLAMA, "llama_state_seq_set_data refused the composed state; the sequence was "
                                        "removed from the cache and must be prefilled again");
    }
    describe(st, selection, n_layer * n_head_kv, n_keep, result);
    return KVC_OK;
}

}  // namespace

extern "C" {

int32_t kvc_context_compose(struct llama_context * ctx, int32_t seq_id, const int32_t * selection, int32_t n_layer,
                            int32_t n_head_kv, int32_t n_keep, int32_t expected_cells, const kvc_refit * refit,
                            kvc_compose_result * result) {
    return kvc::guard([&] {
        return compose_in_place(ctx, seq_id, selection, n_layer, n_head_kv, n_keep, expected_cells, refit, result);
    });
}

int32_t kvc_context_compose_tensors(struct llama_context * ctx, const kvc_capture * cap, int32_t seq_id,
                                    const int32_t * positions, int32_t n_cells, const int32_t * selection,
                                    int32_t n_layer, int32_t n_head_kv, int32_t n_keep, const kvc_refit * refit,
                                    kvc_compose_result * result) {
    return kvc::guard([&] {
        return compose_tensors(ctx, cap, seq_id, positions, n_cells, selection, n_layer, n_head_kv, n_keep, refit,
                               result);
    });
}

int32_t kvc_context_state_info(struct llama_context * ctx, int32_t seq_id, kvc_state_info * info, int32_t * positions,
                               size_t n_positions) {
    return kvc::guard([&] {
        HostBuffer & buf = state_buffer();
        const int32_t status = read_sequence(ctx, seq_id, buf);
        if (status != KVC_OK) return status;
        return kvc_state_parse(buf.data(), buf.size(), info, positions, n_positions);
    });
}

int32_t kvc_context_norms(struct llama_context * ctx, int32_t seq_id, int32_t part, int32_t n_head_kv, float * out,
                          size_t n_values) {
    return kvc::guard([&] {
        HostBuffer & buf = state_buffer();
        const int32_t status = read_sequence(ctx, seq_id, buf);
        if (status != KVC_OK) return status;
        return kvc_state_norms(buf.data(), buf.size(), part, n_head_kv, out, n_values);
    });
}

}  // extern "C"
