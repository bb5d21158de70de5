// Parsing, composing and measuring sequence state buffers. Every read is bounds-checked:
// these buffers may come from a file or a fuzzer, not only from llama.cpp.
#include "state.h"

#include "kvcompose.h"
#include "parallel.h"
#include "status.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace kvc {

namespace {

class Reader {
  public:
    Reader(const uint8_t * data, size_t size) : data_(data), size_(size) {}

    template <typename T>
    bool read(T & v) {
        if (size_ - pos_ < sizeof(T)) {
            return false;
        }
        std::memcpy(&v, data_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return true;
    }

    // Skips count * item bytes, refusing overflow and overrun.
    bool skip(uint64_t count, uint64_t item) {
        if (item != 0 && count > std::numeric_limits<uint64_t>::max() / item) {
            return false;
        }
        const uint64_t n = count * item;
        if (n > size_ - pos_) {
            return false;
        }
        pos_ += static_cast<size_t>(n);
        return true;
    }

    size_t pos() const { return pos_; }
    size_t remaining() const { return size_ - pos_; }
    const uint8_t * here() const { return data_ + pos_; }

  private:
    const uint8_t * data_;
    size_t          size_;
    size_t          pos_ = 0;
};

bool valid_type(int32_t type) {
    return type >= 0 && type < GGML_TYPE_COUNT && ggml_type_size(static_cast<ggml_type>(type)) > 0 &&
           ggml_blck_size(static_cast<ggml_type>(type)) > 0;
}

int32_t corrupt(const std::string & what) { return fail(KVC_ERR_CORRUPT_STATE, "corrupt sequence state: " + what); }

// Reads a K or plain-V header and skips its rows.
int32_t read_rows(Reader & r, uint32_t n_cells, const char * what, uint32_t il, TensorRows & out) {
    if (!r.read(out.type) || !r.read(out.row_size)) {
        return corrupt(std::string("truncated ") + what + " header of layer " + std::to_string(il));
    }
    if (!valid_type(out.type)) {
        return corrupt(std::string("unknown ggml type ") + std::to_string(out.type) + " in " + what);
    }
    const auto type = static_cast<ggml_type>(out.type);
    const uint64_t ts = ggml_type_size(type);
    // a row larger than what is left cannot be followed by its data (and would overflow n_embd below)
    if (out.row_size > r.remaining()) {
        return corrupt(std::string("truncated ") + what + " data of layer " + std::to_string(il));
    }
    if (out.row_size == 0 || out.row_size % ts != 0) {
        return corrupt(std::string(what) + " row size " + std::to_string(out.row_size) + " is not whole blocks");
    }
    out.n_embd = static_cast<int64_t>(out.row_size / ts) * ggml_blck_size(type);
    out.data = r.here();
    out.stride = out.row_size;
    if (!r.skip(n_cells, out.row_size)) {
        return corrupt(std::string("truncated ") + what + " data of layer " + std::to_string(il));
    }
    return KVC_OK;
}

}  // namespace

uint64_t ParsedState::kv_bytes_per_cell() const {
    uint64_t b = 0;
    for (const auto & t : k) b += t.row_size;
    for (const auto & t : v) b += v_trans ? t.row_size * static_cast<uint64_t>(t.n_embd) : t.row_size;
    return b;
}

namespace {

// One cache's part of the buffer (llama_kv_cache::state_write): u32 n_stream, then per stream the cells
// and, if it has any, the layers. Fills out's cell and layer fields; an empty section leaves n_cells 0.
int32_t parse_section(Reader & r, ParsedState & out) {
    if (!r.read(out.n_stream)) {
        return corrupt("truncated header");
    }
    if (out.n_stream == 0 || out.n_stream > 4096) {
        return corrupt("implausible stream count " + std::to_string(out.n_stream));
    }
    bool seen = false;
    for (uint32_t s = 0; s < out.n_stream; ++s) {
        uint32_t cell_count = 0;
        if (!r.read(cell_count)) {
            return corrupt("truncated stream header");
        }
        if (cell_count == 0) {
            continue;
        }
        if (seen) {
            return fail(KVC_ERR_UNSUPPORTED, "sequence state spans several streams");
        }
        seen = true;
        out.stream = s;
        out.n_cells = cell_count;
        // each cell takes at least 12 bytes of metadata: bounds the allocation below
        if (cell_count > r.remaining() / 12) {
            return corrupt("cell count " + std::to_string(cell_count) + " exceeds the buffer");
        }
        out.pos.resize(cell_count);
        out.cell_seq.resize(cell_count);
        for (uint32_t i = 0; i < cell_count; ++i) {
            uint32_t n_seq_id = 0;
            if (!r.read(out.pos[i]) || !r.read(n_seq_id)) {
                return corrupt("truncated cell metadata");
            }
            if (n_seq_id != 1) {
                return corrupt("cell " + std::to_string(i) + " belongs to " + std::to_string(n_seq_id) +
                               " sequences (expected 1; M-RoPE cell layouts are not supported)");
            }
            if (!r.read(out.cell_seq[i])) {
                return corrupt("truncated cell sequence id");
            }
        }
        if (!r.read(out.v_trans) || !r.read(out.n_layer)) {
            return corrupt("truncated layer header");
        }
        if (out.v_trans > 1) {
            return corrupt("v_trans flag " + std::to_string(out.v_trans));
        }
        if (out.n_layer == 0 || out.n_layer > 4096) {
            return corrupt("implausible layer count " + std::to_string(out.n_layer));
        }
        out.k.resize(out.n_layer);
        out.v.resize(out.n_layer);
        for (uint32_t il = 0; il < out.n_layer; ++il) {
            const int32_t st = read_rows(r, cell_count, "K", il, out.k[il]);
            if (st != KVC_OK) return st;
        }
        for (uint32_t il = 0; il < out.n_layer; ++il) {
            TensorRows & v = out.v[il];
            if (!out.v_trans) {
                const int32_t st = read_rows(r, cell_count, "V", il, v);
                if (st != KVC_OK) return st;
                continue;
            }
            uint32_t el_size = 0, n_embd = 0;
            if (!r.read(v.type) || !r.read(el_size) || !r.read(n_embd)) {
                return corrupt("truncated transposed V header of layer " + std::to_string(il));
            }
            if (!valid_type(v.type) || ggml_blck_size(static_cast<ggml_type>(v.type)) != 1 ||
                el_size != ggml_type_size(static_cast<ggml_type>(v.type))) {
                return corrupt("transposed V of layer " + std::to_string(il) + " has type " + std::to_string(v.type) +
                               " and element size " + std::to_string(el_size));
            }
            if (n_embd == 0) {
                return corrupt("transposed V of layer " + std::to_string(il) + " has no elements");
            }
            v.row_size = el_size;
            v.n_embd = n_embd;
            v.data = r.here();
            v.stride = static_cast<size_t>(cell_count) * el_size;
            if (!r.skip(static_cast<uint64_t>(n_embd) * cell_count, el_size)) {
                return corrupt("truncated transposed V data of layer " + std::to_string(il));
            }
        }
    }
    return KVC_OK;
}

}  // namespace

int32_t parse_state(const uint8_t * src, size_t size, ParsedState & out) {
    out = ParsedState{};
    if (src == nullptr && size > 0) {
        return fail(KVC_ERR_INVALID_ARGUMENT, "state buffer is NULL");
    }
    if (size == 0) {
        return corrupt("empty buffer");
    }
    Reader r(src, size);
    if (!r.read(out.magic) || !r.read(out.seq_id)) {
        return corrupt("truncated header");
    }
    if (out.magic != kStateMagic) {
        return corrupt("wrong magic (not a llama_state_seq_get_data buffer)");
    }
    int32_t status = parse_section(r, out);
    if (status != KVC_OK) return status;
    if (out.n_cells == 0) {
        return fail(KVC_ERR_INVALID_ARGUMENT, "the sequence holds no cells");
    }
    if (r.remaining() != 0) {
        // iSWA models (llama_kv_cache_iswa) write their sliding-window cache after the full one:
        // it must parse as one more cache section, to the last byte
        out.tail = r.here();
        out.tail_size = r.remaining();
        ParsedState tail;
        status = parse_section(r, tail);
        if (status != KVC_OK) {
            return fail(status, std::to_string(out.tail_size) +
                                    " trailing bytes that are not a second (sliding-window) cache: " + kvc_last_error());
        }
        if (r.remaining() != 0) {
            return corrupt(std::to_string(r.remaining()) + " trailing bytes (a layout this library does not know)");
        }
        out.tail_n_cells = tail.n_cells;
        out.tail_n_layer = tail.n_layer;
    }
    return KVC_OK;
}

}  // namespace kvc

namespace {

// Bytes of one kv head's slice of a row; fails unless heads split the row into whole blocks.
int32_t head_slice(const kvc::TensorRows & t, int32_t n_head_kv, const char * what, uint32_t il, size_t & bytes) {
    const auto type = static_cast<ggml_type>(t.type);
    const int64_t blck = ggml_blck_size(type);
    if (t.n_embd % n_head_kv != 0 || (t.n_embd / n_head_kv) % blck != 0) {
        return kvc::fail(KVC_ERR_UNSUPPORTED, std::string(what) + " of layer " + std::to_string(il) + " (" +
                                                  ggml_type_name(type) + ", " + std::to_string(t.n_embd) +
                                                  " elements) does not split into " + std::to_string(n_head_kv) +
                                                  " whole-block heads");
    }
    bytes = ggml_row_size(type, t.n_embd / n_head_kv);
    return KVC_OK;
}

class Writer {
  public:
    explicit Writer(uint8_t * dst) : dst_(dst) {}
    template <typename T>
    void put(const T & v) { bytes(&v, sizeof(T)); }
    void bytes(const void * p, size_t n) {
        if (dst_ != nullptr) std::memcpy(dst_ + pos_, p, n);
        pos_ += n;
    }
    void advance(size_t n) { pos_ += n; }
    size_t pos() const { return pos_; }

  private:
    uint8_t * dst_;
    size_t    pos_ = 0;
};

// out[c] = row[idx[c]] for elements of el bytes: the transposed-V gather, a few million elements per
// compression, so the common widths get a typed loop instead of one memcpy call per element.
template <typename T>
void gather_typed(uint8_t * out, const uint8_t * row, const int32_t * idx, int32_t n) {
    for (int32_t c = 0; c < n; ++c) {
        T v;
        std::memcpy(&v, row + static_cast<size_t>(idx[c]) * sizeof(T), sizeof(T));
        std::memcpy(out + static_cast<size_t>(c) * sizeof(T), &v, sizeof(T));
    }
}

void gather(uint8_t * out, const uint8_t * row, const int32_t * idx, int32_t n, uint32_t el) {
    switch (el) {
        case 2: gather_typed<uint16_t>(out, row, idx, n); return;
        case 4: gather_typed<uint32_t>(out, row, idx, n); return;
        default:
            for (int32_t c = 0; c < n; ++c) {
                std::memcpy(out + static_cast<size_t>(c) * el, row + static_cast<size_t>(idx[c]) * el, el);
            }
    }
}

// The layout of a state of n_cells cells with st's layers and types: header, cell metadata (positions
// from pos, read only when writing), each layer's header; the rows are skipped, each layer's start
// noted in k_at/v_at if given; st's second cache, if any, copied at the end. Writes only if dst
// is not NULL; returns the size.
size_t write_layout(const kvc::ParsedState & st, uint32_t n_cells, const int32_t * pos, uint8_t * dst, size_t * k_at,
                    size_t * v_at) {
    Writer w(dst);
    w.put(st.magic);
    w.put(st.seq_id);
    w.put(st.n_stream);
    for (uint32_t s = 0; s < st.n_stream; ++s) {
        const uint32_t count = s == st.stream ? n_cells : 0u;
        w.put(count);
        if (count == 0) continue;
        for (uint32_t c = 0; c < n_cells; ++c) {
            w.put(dst != nullptr ? pos[c] : 0);
            w.put(uint32_t{1});
            w.put(st.cell_seq[0]);
        }
        w.put(st.v_trans);
        w.put(st.n_layer);
        for (uint32_t il = 0; il < st.n_layer; ++il) {
            w.put(st.k[il].type);
            w.put(st.k[il].row_size);
            if (k_at != nullptr) k_at[il] = w.pos();
            w.advance(static_cast<size_t>(n_cells) * st.k[il].row_size);
        }
        for (uint32_t il = 0; il < st.n_layer; ++il) {
            const kvc::TensorRows & v = st.v[il];
            w.put(v.type);
            if (!st.v_trans) {
                w.put(v.row_size);
                if (v_at != nullptr) v_at[il] = w.pos();
                w.advance(static_cast<size_t>(n_cells) * v.row_size);
                continue;
            }
            w.put(static_cast<uint32_t>(v.row_size));
            w.put(static_cast<uint32_t>(v.n_embd));
            if (v_at != nullptr) v_at[il] = w.pos();
            w.advance(static_cast<size_t>(n_cells) * v.n_embd * v.row_size);
        }
    }
    if (st.tail != nullptr) {  // the sliding-window cache, unchanged
        w.bytes(st.tail, st.tail_size);
    }
    return w.pos();
}

}  // namespace

namespace kvc {

size_t state_size(const ParsedState & st, uint32_t n_cells) {
    return write_layout(st, n_cells, nullptr, nullptr, nullptr, nullptr);
}

int32_t compose_rows(const ParsedState & st, const int32_t * sel, int32_t n_layer, int32_t n_head_kv, int32_t n_keep,
                     uint8_t * dst, size_t dst_capacity, size_t * dst_size) {
    if (sel == nullptr || dst_size == nullptr) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "selection or dst_size is NULL");
    }
    if (n_layer != static_cast<int32_t>(st.n_layer) || n_head_kv <= 0 || n_keep <= 0 ||
        n_keep > static_cast<int32_t>(st.n_cells)) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT,
                         "selection is [" + std::to_string(n_layer) + ", " + std::to_string(n_head_kv) + ", " +
                             std::to_string(n_keep) + "] for a state of " + std::to_string(st.n_layer) +
                             " layers and " + std::to_string(st.n_cells) + " cells");
    }
    const size_t rows = static_cast<size_t>(n_layer) * n_head_kv;
    std::vector<int32_t> new_pos(n_keep, std::numeric_limits<int32_t>::min());
    for (size_t r = 0; r < rows; ++r) {
        const int32_t * s = sel + r * n_keep;
        for (int32_t c = 0; c < n_keep; ++c) {
            if (s[c] < 0 || s[c] >= static_cast<int32_t>(st.n_cells) || (c > 0 && s[c] <= s[c - 1])) {
                return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "selection row " + std::to_string(r) +
                                                               " is not strictly ascending cell indices below " +
                                                               std::to_string(st.n_cells));
            }
            new_pos[c] = std::max(new_pos[c], st.pos[s[c]]);
        }
    }
    std::vector<size_t> k_head(n_layer), v_head(n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        int32_t status = head_slice(st.k[il], n_head_kv, "K", il, k_head[il]);
        if (status != KVC_OK) return status;
        if (st.v_trans) {
            if (st.v[il].n_embd % n_head_kv != 0) {
                return kvc::fail(KVC_ERR_UNSUPPORTED, "V of layer " + std::to_string(il) + " does not split into heads");
            }
        } else {
            status = head_slice(st.v[il], n_head_kv, "V", il, v_head[il]);
            if (status != KVC_OK) return status;
        }
    }

    // The layout is sized first, then (if there is room) its headers are written; the rows (the bulk:
    // a gather per kv head) are then copied layer by layer over the cores, each into its own span.
    *dst_size = write_layout(st, static_cast<uint32_t>(n_keep), nullptr, nullptr, nullptr, nullptr);
    if (dst == nullptr) return KVC_OK;
    if (dst_capacity < *dst_size) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "dst holds " + std::to_string(dst_capacity) +
                                                       " bytes, the composed state needs " + std::to_string(*dst_size));
    }
    std::vector<size_t> k_at(n_layer), v_at(n_layer);
    write_layout(st, static_cast<uint32_t>(n_keep), new_pos.data(), dst, k_at.data(), v_at.data());
    // rows of (layer, kv head) selection[c] in cell order, the kv heads of a cell side by side
    auto copy_rows = [&](const kvc::TensorRows & t, size_t head_bytes, int32_t il, uint8_t * out) {
        for (int32_t c = 0; c < n_keep; ++c) {
            for (int32_t g = 0; g < n_head_kv; ++g) {
                const int32_t cell = sel[(static_cast<size_t>(il) * n_head_kv + g) * n_keep + c];
                std::memcpy(out, t.data + cell * t.stride + g * head_bytes, head_bytes);
                out += head_bytes;
            }
        }
    };
    kvc::parallel_for(2 * static_cast<int64_t>(n_layer), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            const int32_t il = static_cast<int32_t>(i / 2);  // K and V of a layer on one core: even split
            if (i % 2 == 0) {
                copy_rows(st.k[il], k_head[il], il, dst + k_at[il]);
            } else if (!st.v_trans) {
                copy_rows(st.v[il], v_head[il], il, dst + v_at[il]);
            } else {  // one row of cells per element: the element's kv head picks the cells
                const kvc::TensorRows & v = st.v[il];
                const uint32_t el = static_cast<uint32_t>(v.row_size);
                const int64_t head_dim = v.n_embd / n_head_kv;
                for (int64_t e = 0; e < v.n_embd; ++e) {
                    const int32_t * s = sel + (static_cast<size_t>(il) * n_head_kv + e / head_dim) * n_keep;
                    gather(dst + v_at[il] + static_cast<size_t>(e) * n_keep * el, v.data + e * v.stride, s, n_keep, el);
                }
            }
        }
    }, *dst_size >= (1u << 20));
    return KVC_OK;
}

bool readable_as_f32(int32_t type, bool transposed) {
    const auto t = static_cast<ggml_type>(type);
    if (t == GGML_TYPE_F32) return true;
    const ggml_type_traits * tr = ggml_get_type_traits(t);
    return tr != nullptr && tr->to_float != nullptr && (!transposed || ggml_blck_size(t) == 1);
}

void to_f32(int32_t type, const uint8_t * src, float * dst, int64_t n) {
    if (type == GGML_TYPE_F32) {
        std::memcpy(dst, src, n * sizeof(float));
    } else {
        ggml_get_type_traits(static_cast<ggml_type>(type))->to_float(src, dst, n);
    }
}

int32_t row_norms(const ParsedState & st, int32_t part, int32_t n_head_kv, float * out, size_t n_values) {
    if (out == nullptr || n_head_kv <= 0) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "out is NULL or n_head_kv is not positive");
    }
    if (part != KVC_PART_K && part != KVC_PART_V) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "part must be KVC_PART_K or KVC_PART_V");
    }
    if (n_values != static_cast<size_t>(st.n_layer) * n_head_kv * st.n_cells) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "out must hold n_layer * n_head_kv * n_cells values");
    }
    if (part == KVC_PART_V && st.v.size() != st.n_layer) {
        return kvc::fail(KVC_ERR_UNSUPPORTED, "the state has no V tensors");
    }
    const char * what = part == KVC_PART_K ? "key" : "value";
    // K is always one row per cell; V is too unless stored transposed (one row of cells per element)
    const bool transposed = part == KVC_PART_V && st.v_trans;
    for (uint32_t il = 0; il < st.n_layer; ++il) {
        const kvc::TensorRows & t = part == KVC_PART_K ? st.k[il] : st.v[il];
        if (t.n_embd % n_head_kv != 0) {
            return kvc::fail(KVC_ERR_UNSUPPORTED, std::string(what) + " rows do not split into heads");
        }
        if (!readable_as_f32(t.type, transposed)) {
            return kvc::fail(KVC_ERR_UNSUPPORTED,
                             std::string(what) + " norms of " + ggml_type_name(static_cast<ggml_type>(t.type)));
        }
    }
    const uint32_t n_cells = st.n_cells;
    // rows are converted to f32 in bulk by ggml's type traits; squares are summed in double
    kvc::parallel_for(st.n_layer, [&](int64_t l0, int64_t l1) {
        std::vector<float> row;
        std::vector<double> acc;
        for (int64_t il = l0; il < l1; ++il) {
            const kvc::TensorRows & t = part == KVC_PART_K ? st.k[il] : st.v[il];
            const int64_t hd = t.n_embd / n_head_kv;
            acc.assign(static_cast<size_t>(n_head_kv) * n_cells, 0.0);
            if (transposed) {
                row.resize(n_cells);
                for (int64_t e = 0; e < t.n_embd; ++e) {
                    to_f32(t.type, t.data + static_cast<size_t>(e) * t.stride, row.data(), n_cells);
                    double * a = acc.data() + static_cast<size_t>(e / hd) * n_cells;
                    for (uint32_t c = 0; c < n_cells; ++c) a[c] += static_cast<double>(row[c]) * row[c];
                }
            } else {
                row.resize(t.n_embd);
                for (uint32_t c = 0; c < n_cells; ++c) {
                    to_f32(t.type, t.data + static_cast<size_t>(c) * t.stride, row.data(), t.n_embd);
                    for (int64_t g = 0; g < n_head_kv; ++g) {
                        double a = 0.0;
                        for (int64_t e = g * hd; e < (g + 1) * hd; ++e) a += static_cast<double>(row[e]) * row[e];
                        acc[static_cast<size_t>(g) * n_cells + c] = a;
                    }
                }
            }
            float * dst = out + static_cast<size_t>(il) * n_head_kv * n_cells;
            for (size_t i = 0; i < acc.size(); ++i) dst[i] = static_cast<float>(std::sqrt(acc[i]));
        }
    }, static_cast<uint64_t>(st.n_layer) * n_cells * n_head_kv >= (1u << 14));
    return KVC_OK;
}

}  // namespace kvc

namespace {

int32_t compose(const uint8_t * src, size_t src_size, const int32_t * sel, int32_t n_layer, int32_t n_head_kv,
                int32_t n_keep, uint8_t * dst, size_t dst_capacity, size_t * dst_size) {
    kvc::ParsedState st;
    const int32_t status = kvc::parse_state(src, src_size, st);
    if (status != KVC_OK) return status;
    return kvc::compose_rows(st, sel, n_layer, n_head_kv, n_keep, dst, dst_capacity, dst_size);
}

int32_t norms(const uint8_t * src, size_t src_size, int32_t part, int32_t n_head_kv, float * out, size_t n_values) {
    if (out == nullptr || n_head_kv <= 0) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "out is NULL or n_head_kv is not positive");
    }
    kvc::ParsedState st;
    const int32_t status = kvc::parse_state(src, src_size, st);
    if (status != KVC_OK) return status;
    return kvc::row_norms(st, part, n_head_kv, out, n_values);
}

}  // namespace

extern "C" {

int32_t kvc_state_parse(const uint8_t * src, size_t src_size, kvc_state_info * info, int32_t * positions,
                        size_t n_positions) {
    return kvc::guard([&] {
        if (info == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "info is NULL");
        }
        kvc::ParsedState st;
        const int32_t status = kvc::parse_state(src, src_size, st);
        if (status != KVC_OK) return status;
        info->n_cells  = st.n_cells;
        info->n_layer  = st.n_layer;
        info->v_trans  = st.v_trans;
        info->k_type   = st.k[0].type;
        info->v_type   = st.v.empty() ? -1 : st.v[0].type;
        info->pos_min  = *std::min_element(st.pos.begin(), st.pos.end());
        info->pos_max  = *std::max_element(st.pos.begin(), st.pos.end());
        info->seq_id   = st.seq_id;
        info->kv_bytes = st.kv_bytes_per_cell() * st.n_cells;
        info->swa_n_cells = st.tail_n_cells;
        info->swa_n_layer = st.tail_n_layer;
        if (positions != nullptr) {
            if (n_positions < st.n_cells) {
                return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "positions holds fewer entries than the state has cells");
            }
            std::copy(st.pos.begin(), st.pos.end(), positions);
        }
        return static_cast<int32_t>(KVC_OK);
    });
}

int32_t kvc_state_compose(const uint8_t * src, size_t src_size, const int32_t * selection, int32_t n_layer,
                          int32_t n_head_kv, int32_t n_keep, uint8_t * dst, size_t dst_capacity, size_t * dst_size) {
    return kvc::guard(
        [&] { return compose(src, src_size, selection, n_layer, n_head_kv, n_keep, dst, dst_capacity, dst_size); });
}

int32_t kvc_state_norms(const uint8_t * src, size_t src_size, int32_t part, int32_t n_head_kv, float * out,
                        size_t n_values) {
    return kvc::guard([&] { return norms(src, src_size, part, n_head_kv, out, n_values); });
}

}  // extern "C"
