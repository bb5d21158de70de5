// Operations on a live llama_context: read the sequence through the host state API, rewrite it,
// and put the original back if llama.cpp refuses the rewrite.
#include "kvcompose.h"
#include "state.h"
#include "status.h"

#include "llama.h"

#include <memory>
#include <string>

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

int32_t compose_in_place(llama_context * ctx, int32_t seq_id, const int32_t * selection, int32_t n_layer,
                         int32_t n_head_kv, int32_t n_keep, int32_t expected_cells, kvc_compose_result * result) {
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

    size_t size = 0;
    status = kvc_state_compose(before.data(), before.size(), selection, n_layer, n_head_kv, n_keep, nullptr, 0, &size);
    if (status != KVC_OK) return status;
    HostBuffer & after = composed_buffer();
    after.resize(size);
    status = kvc_state_compose(before.data(), before.size(), selection, n_layer, n_head_kv, n_keep, after.data(),
                               after.size(), &size);
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
    if (result != nullptr) {
        kvc_state_info info{};
        kvc_state_parse(after.data(), after.size(), &info, nullptr, 0);
        result->cells_before    = st.n_cells;
        result->cells_after     = info.n_cells;
        result->kv_bytes_before = st.kv_bytes_per_cell() * st.n_cells;
        result->kv_bytes_after  = info.kv_bytes;
        result->pos_max         = info.pos_max;
    }
    return KVC_OK;
}

}  // namespace

extern "C" {

int32_t kvc_context_compose(struct llama_context * ctx, int32_t seq_id, const int32_t * selection, int32_t n_layer,
                            int32_t n_head_kv, int32_t n_keep, int32_t expected_cells, kvc_compose_result * result) {
    return kvc::guard([&] {
        return compose_in_place(ctx, seq_id, selection, n_layer, n_head_kv, n_keep, expected_cells, result);
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
