// Attention capture: reduces llama.cpp's "kq_soft_max-{il}" tensors, ubatch by ubatch, into one
// score per (layer, query head, key column), so no full attention matrix is ever kept. With flash
// attention that matrix never exists: the probabilities are recomputed from the inputs of the
// GGML_OP_FLASH_ATTN_EXT node (queries after RoPE, the cache's keys, llama.cpp's own mask, its KQ
// scale, softcap and sinks), read when "kqv_out-{il}" is done. Both are reduced on the tensors' backend
// by backend_reduce.cpp; this file's loops over host copies are the reference (KVC_REDUCE_HOST) and the
// fallback where a backend lacks an op.
#include "capture.h"
#include "kvcompose.h"
#include "parallel.h"
#include "state.h"
#include "status.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr const char * kSoftMaxPrefix = "kq_soft_max-";
constexpr const char * kAttnOutPrefix = "kqv_out-";

// Layer index of a "{prefix}{il}" tensor, or -1 for any other tensor.
int32_t layer_of(const ggml_tensor * t, const char * prefix) {
    const char * name = ggml_get_name(t);
    const size_t plen = std::strlen(prefix);
    if (std::strncmp(name, prefix, plen) != 0) {
        return -1;
    }
    char * end = nullptr;
    const long il = std::strtol(name + plen, &end, 10);
    if (end == name + plen || *end != '\0' || il < 0 || il > std::numeric_limits<int32_t>::max()) {
        return -1;
    }
    return static_cast<int32_t>(il);
}

int32_t softmax_layer(const ggml_tensor * t) { return layer_of(t, kSoftMaxPrefix); }

// The flash-attention node behind "kqv_out-{il}" (a reshape of its result), or nullptr.
const ggml_tensor * flash_attn_node(const ggml_tensor * t) {
    for (int hop = 0; hop < 3 && t != nullptr; ++hop, t = t->src[0]) {
        if (t->op == GGML_OP_FLASH_ATTN_EXT) return t;
    }
    return nullptr;
}

// Host bytes of t (a view included): its own data on a host buffer, else a copy into `staging`.
// Counted in cap.host_bytes either way: what a device build would copy.
const char * host_data(kvc_capture & cap, const ggml_tensor * t, std::vector<float> & staging) {
    cap.host_bytes += ggml_nbytes(t);
    if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
        return static_cast<const char *>(t->data);
    }
    const size_t nbytes = ggml_nbytes(t);
    staging.resize((nbytes + sizeof(float) - 1) / sizeof(float));
    ggml_backend_tensor_get(t, staging.data(), 0, nbytes);
    return reinterpret_cast<const char *>(staging.data());
}

// Layer index of a KV cache tensor "cache_{k,v}_l{il}" (llama_kv_cache's names), or -1.
int32_t cache_layer(const ggml_tensor * t, char part) {
    const char prefix[] = {'c', 'a', 'c', 'h', 'e', '_', part, '_', 'l', '\0'};
    return layer_of(t, prefix);
}

// Records the K and V cache tensors that layer il's attention output "kqv_out-{il}" is computed from:
// the roots of the views among its ancestors (a few ops up: q.k, softmax, kq.v or flash attention).
// Read from the graph's structure when the scheduler asks, so it costs no data transfer.
void find_cache_tensors(kvc_capture & cap, const ggml_tensor * out, int32_t il) {
    std::vector<std::pair<const ggml_tensor *, int>> todo{{out, 0}};
    std::vector<const ggml_tensor *> seen;
    while (!todo.empty() && seen.size() < 64) {
        const auto [t, depth] = todo.back();
        todo.pop_back();
        if (t == nullptr || std::find(seen.begin(), seen.end(), t) != seen.end()) continue;
        seen.push_back(t);
        if (const ggml_tensor * root = t->view_src) {
            if (cache_layer(root, 'k') == il) {
                cap.k_cache[il] = root;
            } else if (cache_layer(root, 'v') == il) {
                cap.v_cache[il] = root;
                if (t->op == GGML_OP_VIEW) {  // llama_kv_cache::get_v's view: strides tell the layout
                    cap.v_trans[il] = t->nb[1] > t->nb[2] ? 1 : 0;
                }
            }
        }
        if (depth < 8) {
            for (const ggml_tensor * src : t->src) todo.push_back({src, depth + 1});
        }
    }
}

// Entry j of a row of llama.cpp's attention mask (f16 or f32).
inline float mask_value(const ggml_tensor * mask, const char * row, int64_t j) {
    if (mask->type == GGML_TYPE_F16) {
        ggml_fp16_t h;
        std::memcpy(&h, row + j * mask->nb[0], sizeof h);
        return ggml_fp16_to_fp32(h);
    }
    float v;
    std::memcpy(&v, row + j * mask->nb[0], sizeof v);
    return v;
}

// Layer 0 only: counts, for every key column j < n_keys, the query rows [0, n_tok) whose mask row
// does not hide cell j (llama.cpp's mask holds -inf for other sequences' cells, empty cells and
// later positions).
void count_visible(kvc_capture & cap, const ggml_tensor * mask, int64_t n_tok, int32_t il) {
    if (il != 0 || mask == nullptr) return;
    if ((mask->type != GGML_TYPE_F16 && mask->type != GGML_TYPE_F32) || mask->ne[1] < n_tok) {
        cap.error = "attention mask of an unexpected type or shape";
        return;
    }
    std::vector<float> stage;
    const char * md = host_data(cap, mask, stage);
    if (md == nullptr) return;
    const int64_t m = std::min<int64_t>(mask->ne[0], cap.n_keys);
    for (int64_t t = 0; t < n_tok; ++t) {
        const char * row = md + t * mask->nb[1];
        for (int64_t j = 0; j < m; ++j) {
            cap.visible[j] += mask_value(mask, row, j) != -INFINITY;
        }
    }
}

// Recompute softmax(scale * q.k [softcapped] + mask) as ggml's CPU kernels define it and fold
// columns [0, n_keys) into the capture. Heads are split over threads; each thread owns whole heads,
// so no two write the same scores.
void recompute(kvc_capture & cap, const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * mask,
               const ggml_tensor * sinks, float scale, float max_bias, float softcap, int32_t il) {
    // q [D, n_tokens, n_head, n_stream] f32; k [D, n_kv, n_head_kv, n_stream]; mask [n_kv, >= n_tokens, *, *] f16
    const int64_t D = q->ne[0], n_tok = q->ne[1], n_head = q->ne[2], n_kv = k->ne[1], n_head_kv = k->ne[2];
    if (q->type != GGML_TYPE_F32 || q->nb[0] != sizeof(float) || k->ne[0] != D || q->ne[3] != 1 || k->ne[3] != 1) {
        cap.error = "flash attention inputs of an unexpected layout";
        return;
    }
    if (n_head != cap.n_head || n_head_kv <= 0 || n_head % n_head_kv != 0) {
        cap.error = "flash attention with " + std::to_string(n_head) + " query heads, expected " + std::to_string(cap.n_head);
        return;
    }
    if (max_bias != 0.0f) {
        cap.error = "ALiBi attention (max_bias != 0) is not supported by the flash-attention capture";
        return;
    }
    if (mask != nullptr && ((mask->type != GGML_TYPE_F16 && mask->type != GGML_TYPE_F32) || mask->ne[0] < n_kv ||
                            mask->ne[1] < n_tok)) {
        cap.error = "flash attention mask of an unexpected type or shape";
        return;
    }
    if (sinks != nullptr && (sinks->type != GGML_TYPE_F32 || sinks->ne[0] < n_head)) {
        cap.error = "attention sinks of an unexpected type or shape";
        return;
    }
    const ggml_type_traits * tr = ggml_get_type_traits(k->type);
    if (k->type != GGML_TYPE_F32 && (tr == nullptr || tr->to_float == nullptr || D % ggml_blck_size(k->type) != 0)) {
        cap.error = std::string("keys of type ") + ggml_type_name(k->type) + " cannot be read as floats";
        return;
    }
    const int64_t n_rows = kvc::pooled_rows_of(cap, il, n_tok);  // rows [n_rows, n_tok): padding, not pooled
    if (n_rows == 0) return;
    std::vector<float> q_stage, k_stage, m_stage, s_stage;
    const char * qd = host_data(cap, q, q_stage);
    const char * kd = host_data(cap, k, k_stage);
    const char * md = mask != nullptr ? host_data(cap, mask, m_stage) : nullptr;
    const char * sd = sinks != nullptr ? host_data(cap, sinks, s_stage) : nullptr;
    if (qd == nullptr || kd == nullptr || (mask != nullptr && md == nullptr)) {
        cap.error = "flash attention inputs have no data";
        return;
    }
    // keys once per layer as f32 rows
    cap.keys.resize(static_cast<size_t>(n_head_kv) * n_kv * D);
    for (int64_t g = 0; g < n_head_kv; ++g) {
        for (int64_t j = 0; j < n_kv; ++j) {
            const char * row = kd + j * k->nb[1] + g * k->nb[2];
            float * dst = cap.keys.data() + (static_cast<size_t>(g) * n_kv + j) * D;
            if (k->type == GGML_TYPE_F32) {
                std::memcpy(dst, row, D * sizeof(float));
            } else {
                tr->to_float(row, dst, D);
            }
        }
    }
    // ggml rounds each query to the type its dot product with K takes (f16 for f16 keys, q8_0 for
    // block-quantized ones) before multiplying; so do we, so that both paths agree to the last bits
    ggml_type q_type = GGML_TYPE_F32;
    if (k->type == GGML_TYPE_F16 || k->type == GGML_TYPE_BF16) {
        q_type = k->type;
    } else if (ggml_is_quantized(k->type)) {
        q_type = GGML_TYPE_Q8_0;
    }
    const ggml_type_traits * qt = ggml_get_type_traits(q_type);
    if (q_type != GGML_TYPE_F32 && (D % ggml_blck_size(q_type) != 0 || qt->from_float_ref == nullptr)) {
        q_type = GGML_TYPE_F32;
    }
    const int64_t m = std::min<int64_t>(n_kv, cap.n_keys);
    const int64_t group = n_head / n_head_kv;
    const int64_t n_head_rows = kvc::head_rows_of(cap, il, n_rows);
    auto work = [&](int64_t h0, int64_t h1) {
        std::vector<float> logits(n_kv), q_round(D);
        std::vector<uint8_t> q_packed(q_type == GGML_TYPE_F32 ? 0 : ggml_row_size(q_type, D));
        for (int64_t h = h0; h < h1; ++h) {
            const float * keys = cap.keys.data() + static_cast<size_t>(h / group) * n_kv * D;
            const size_t at = (static_cast<size_t>(il) * cap.n_head + h) * cap.n_keys;
            float *  mx = cap.max.data() + at;
            double * sm = cap.sum.data() + at;
            float *  hmx = n_head_rows > 0 ? cap.head_max.data() + at : nullptr;
            double * hsm = n_head_rows > 0 ? cap.head_sum.data() + at : nullptr;
            for (int64_t t = 0; t < n_rows; ++t) {
                const float * qv = reinterpret_cast<const float *>(qd + t * q->nb[1] + h * q->nb[2]);
                if (q_type != GGML_TYPE_F32) {
                    qt->from_float_ref(qv, q_packed.data(), D);
                    qt->to_float(q_packed.data(), q_round.data(), D);
                    qv = q_round.data();
                }
                const char * mrow = md == nullptr ? nullptr
                                                  : md + t * mask->nb[1] + (h % mask->ne[2]) * mask->nb[2];
                float M = -INFINITY;
                for (int64_t j = 0; j < n_kv; ++j) {
                    const float mv = mrow != nullptr ? mask_value(mask, mrow, j) : 0.0f;
                    if (mv == -INFINITY) {
                        logits[j] = -INFINITY;
                        continue;
                    }
                    const float * kv = keys + static_cast<size_t>(j) * D;
                    float dot = 0.0f;
                    for (int64_t d = 0; d < D; ++d) dot += qv[d] * kv[d];  // vectorised by the compiler
                    float s = softcap != 0.0f ? softcap * std::tanh(dot * (scale / softcap)) : dot * scale;
                    s += mv;
                    logits[j] = s;
                    M = std::max(M, s);
                }
                if (sd != nullptr) {
                    M = std::max(M, reinterpret_cast<const float *>(sd)[h]);
                }
                if (M == -INFINITY) continue;  // a padding row that sees nothing
                double S = 0.0;
                for (int64_t j = 0; j < n_kv; ++j) {
                    if (logits[j] != -INFINITY) S += std::exp(static_cast<double>(logits[j] - M));
                }
                if (sd != nullptr) S += std::exp(static_cast<double>(reinterpret_cast<const float *>(sd)[h] - M));
                const bool head = t < n_head_rows;
                for (int64_t j = 0; j < m; ++j) {
                    const float p = logits[j] == -INFINITY ? 0.0f : static_cast<float>(std::exp(logits[j] - M) / S);
                    mx[j] = std::max(mx[j], p);
                    sm[j] += p;
                    if (head) {
                        hmx[j] = std::max(hmx[j], p);
                        hsm[j] += p;
                    }
                }
            }
        }
    };
    kvc::parallel_for(n_head, work);
    count_visible(cap, mask, n_rows, il);
    if (n_head_rows > 0) cap.head_queries[il] += n_head_rows;
    cap.n_queries[il] += n_rows;
}

float op_param(const ggml_tensor * t, int i) {
    float v;
    std::memcpy(&v, reinterpret_cast<const float *>(t->op_params) + i, sizeof v);
    return v;
}

// ggml_flash_attn_ext(q, k, v, mask, scale, max_bias, softcap) [+ sinks]
kvc::AttentionInputs flash_inputs(const ggml_tensor * fa) {
    kvc::AttentionInputs in;
    in.q = fa->src[0];
    in.k = fa->src[1];
    in.mask = fa->src[3];
    in.sinks = fa->src[4];
    in.scale = op_param(fa, 0);
    in.max_bias = op_param(fa, 1);
    in.softcap = op_param(fa, 2);
    return in;
}

void reduce_flash(kvc_capture & cap, const ggml_tensor * fa, int32_t il) {
    const kvc::AttentionInputs in = flash_inputs(fa);
    recompute(cap, in.q, in.k, in.mask, in.sinks, in.scale, in.max_bias, in.softcap, il);
}

// The reduction on the tensors' backend (KVC_REDUCE_BACKEND); false: the caller reduces on the host,
// and the first reason the backend could not is kept for kvc_capture_get_fallback (and in `why`).
bool on_backend(kvc_capture & cap, const kvc::AttentionInputs & in, int32_t il, std::string & why) {
    why.clear();
    if (cap.reduce_where != KVC_REDUCE_BACKEND) return false;
    if (!cap.reducer) cap.reducer = std::make_unique<kvc::BackendReducer>();
    if (cap.reducer->reduce(cap, in, il, why)) return true;
    if (cap.fallback.empty() && !why.empty()) cap.fallback = why;
    return false;
}

bool on_backend(kvc_capture & cap, const kvc::AttentionInputs & in, int32_t il) {
    std::string why;
    return on_backend(cap, in, il, why);
}

// Asked about "kqv_out-{il}", before its flash-attention node runs: where the reduction will compute the
// layer's attention output anyway (the CPU recomputes the probabilities for the scores), ggml's flash kernel
// is skipped, so that the probe computes the attention once instead of twice. The kernel loops over its
// keys' view: cut to one key, it costs next to nothing, and the reduction then writes the node's output.
void skip_flash_kernel(kvc_capture & cap, ggml_tensor * fa) {
    if (fa == nullptr || cap.reduce_where != KVC_REDUCE_BACKEND || !cap.error.empty() || fa->src[1] == nullptr ||
        fa->src[2] == nullptr || fa->src[1]->ne[1] <= 1) {
        return;
    }
    kvc::AttentionInputs in = flash_inputs(fa);
    in.v = fa->src[2];
    in.out = fa;
    if (!cap.reducer) cap.reducer = std::make_unique<kvc::BackendReducer>();
    if (!cap.reducer->writes_output(cap, in)) return;
    cap.skipped.push_back({fa, fa->src[1], fa->src[1]->ne[1]});
    fa->src[1]->ne[1] = 1;
}

// Observed (or the capture ended): the keys' count of a skipped kernel restored, so that the graph is the
// model's again (llama.cpp reuses it for later decodes). Returns whether fa's kernel was skipped; nullptr
// restores them all.
bool restore_flash_kernel(kvc_capture & cap, const ggml_tensor * fa) {
    bool found = false;
    for (auto it = cap.skipped.begin(); it != cap.skipped.end();) {
        if (fa == nullptr || it->node == fa) {
            it->keys->ne[1] = it->n_kv;
            found = found || it->node == fa;
            it = cap.skipped.erase(it);
        } else {
            ++it;
        }
    }
    return found;
}

// kq_soft_max = ggml_soft_max_ext(mul_mat(k, q), mask, scale, max_bias) [+ sinks], recomputed from
// its inputs instead of read: the check that both ways agree (kvc_capture_set_recompute)
void recompute_softmax(kvc_capture & cap, const ggml_tensor * sm, int32_t il) {
    const ggml_tensor * kq = sm->src[0];
    if (kq == nullptr || kq->op != GGML_OP_MUL_MAT) {
        cap.error = "kq_soft_max is not a softmax of q.k (softcapped attention): cannot recompute it";
        return;
    }
    recompute(cap, kq->src[1], kq->src[0], sm->src[1], sm->src[2], op_param(sm, 0), op_param(sm, 1), 0.0f, il);
}

void reduce(kvc_capture & cap, const ggml_tensor * t, int32_t il) {
    if (t->type != GGML_TYPE_F32) {
        cap.error = std::string("attention tensor of type ") + ggml_type_name(t->type) + ", expected f32";
        return;
    }
    // ne = [n_kv, n_tokens, n_head, n_stream]
    const int64_t n_kv = t->ne[0], n_tok = t->ne[1], n_head = t->ne[2], n_stream = t->ne[3];
    if (n_head != cap.n_head || n_stream != 1) {
        cap.error = "attention tensor with " + std::to_string(n_head) + " heads and " + std::to_string(n_stream) +
                    " streams, expected " + std::to_string(cap.n_head) + " heads and 1 stream";
        return;
    }
    if (t->nb[0] != sizeof(float)) {
        cap.error = "attention tensor rows are not contiguous";
        return;
    }

    const int64_t n_rows = kvc::pooled_rows_of(cap, il, n_tok);  // rows [n_rows, n_tok): padding, not pooled
    if (n_rows == 0) return;
    const char * base = host_data(cap, t, cap.staging);  // device tensor: one host copy per layer and ubatch
    if (base == nullptr) {
        cap.error = "attention tensor has no data";
        return;
    }

    const int64_t m = std::min<int64_t>(n_kv, cap.n_keys);
    const int64_t n_head_rows = kvc::head_rows_of(cap, il, n_rows);
    kvc::parallel_for(n_head, [&](int64_t h0, int64_t h1) {
        for (int64_t h = h0; h < h1; ++h) {
            const size_t at = (static_cast<size_t>(il) * cap.n_head + h) * cap.n_keys;
            float *  mx = cap.max.data() + at;
            double * sm = cap.sum.data() + at;
            for (int64_t q = 0; q < n_rows; ++q) {
                const float * row = reinterpret_cast<const float *>(base + h * t->nb[2] + q * t->nb[1]);
                kvc::fold_max_sum(mx, sm, row, row, m);
                if (q < n_head_rows) kvc::fold_max_sum(cap.head_max.data() + at, cap.head_sum.data() + at, row, row, m);
            }
        }
    });
    count_visible(cap, t->src[1], n_rows, il);
    if (n_head_rows > 0) cap.head_queries[il] += n_head_rows;
    cap.n_queries[il] += n_rows;
}

// Cache cells [0, n_cells) of one layer's K or V cache tensor as TensorRows, laid out like
// llama_kv_cache::state_write_data: rows of cells (K, plain V) or, transposed, rows of elements with
// the cells of each element kv_size apart. A tensor on a device buffer is copied into `stage` first.
int32_t tensor_rows(const ggml_tensor * t, bool transposed, uint32_t n_cells, const char * what, int32_t il,
                    kvc::TensorRows & out, std::vector<uint8_t> & stage) {
    const std::string name = std::string(what) + " cache of layer " + std::to_string(il);
    if (t == nullptr) {
        return kvc::fail(KVC_ERR_UNSUPPORTED, "the capture did not see the " + name);
    }
    const auto type = t->type;
    if (t->ne[2] != 1 || t->ne[3] != 1 || t->ne[1] < static_cast<int64_t>(n_cells) ||
        t->nb[0] != ggml_type_size(type) || t->nb[1] != ggml_row_size(type, t->ne[0]) ||
        (transposed && ggml_blck_size(type) != 1)) {
        return kvc::fail(KVC_ERR_UNSUPPORTED, name + " has a layout this library does not read directly");
    }
    out.type = type;
    out.n_embd = t->ne[0];
    out.row_size = transposed ? ggml_type_size(type) : ggml_row_size(type, t->ne[0]);
    const size_t kv_size = static_cast<size_t>(t->ne[1]);
    if (t->data == nullptr) {
        return kvc::fail(KVC_ERR_UNSUPPORTED, name + " has no data");
    }
    if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {  // no buffer: a plain ggml context's memory
        out.data = static_cast<const uint8_t *>(t->data);
        out.stride = transposed ? kv_size * out.row_size : static_cast<size_t>(t->nb[1]);
        return KVC_OK;
    }
    // device buffer: only the sequence's cells, contiguous
    if (!transposed) {
        stage.resize(static_cast<size_t>(n_cells) * out.row_size);
        ggml_backend_tensor_get(t, stage.data(), 0, stage.size());
    } else {
        const size_t row = static_cast<size_t>(n_cells) * out.row_size;
        stage.resize(static_cast<size_t>(out.n_embd) * row);
        for (int64_t e = 0; e < out.n_embd; ++e) {
            ggml_backend_tensor_get(t, stage.data() + e * row, e * kv_size * out.row_size, row);
        }
    }
    out.data = stage.data();
    out.stride = transposed ? static_cast<size_t>(n_cells) * out.row_size : out.row_size;
    return KVC_OK;
}

// Keeps every cap.query_every-th query row of this ubatch (counted from the capture's first, before this
// ubatch's rows are counted), up to cap.query_max per layer: the reference queries a value refit
// reproduces. q [D, n_tokens, n_head] f32 (a permuted view), scale: the layer's KQ scale.
void keep_queries(kvc_capture & cap, const ggml_tensor * q, float scale, float softcap, float max_bias, int32_t il) {
    if (cap.query_max <= 0 || q == nullptr) return;
    if (max_bias != 0.0f) {  // ALiBi adds a position bias the refit's softmax(s q.k) does not model
        cap.queries_unusable = "ALiBi attention";
        return;
    }
    auto & kept = cap.queries[il];
    const int64_t D = q->ne[0], n_tok = q->ne[1], n_head = q->ne[2];
    if (q->type != GGML_TYPE_F32 || q->nb[0] != sizeof(float) || n_head != cap.n_head || q->ne[3] != 1) {
        cap.error = "queries of an unexpected type or layout";
        return;
    }
    if (softcap != 0.0f) {  // a refit's least squares assume softmax(s q.k): it refuses these layers
        cap.queries_unusable = "softcapped attention";
        return;
    }
    if (cap.query_dim[il] != 0 && cap.query_dim[il] != D) {
        cap.error = "queries of layer " + std::to_string(il) + " changed their dimension";
        return;
    }
    cap.query_dim[il] = static_cast<int32_t>(D);
    cap.query_scale[il] = scale;
    const int64_t first = cap.n_queries[il];
    const int64_t n_rows = kvc::pooled_rows_of(cap, il, n_tok);
    std::vector<float> stage;
    const char * base = nullptr;
    for (int64_t t = 0; t < n_rows; ++t) {
        if ((first + t) % cap.query_every != 0) continue;
        if (static_cast<int64_t>(kept.size()) >= static_cast<int64_t>(cap.query_max) * n_head * D) break;
        if (base == nullptr && (base = host_data(cap, q, stage)) == nullptr) {
            cap.error = "queries have no data";
            return;
        }
        for (int64_t h = 0; h < n_head; ++h) {
            const float * row = reinterpret_cast<const float *>(base + t * q->nb[1] + h * q->nb[2]);
            kept.insert(kept.end(), row, row + D);
        }
    }
}

// The queries and scale of llama.cpp's kq_soft_max = soft_max_ext(mul_mat(k, q), mask, scale): nullptr if
// the scores are not a plain q.k (softcapped attention scales and tanh's them first).
const ggml_tensor * softmax_queries(const ggml_tensor * sm) {
    const ggml_tensor * kq = sm->src[0];
    return kq != nullptr && kq->op == GGML_OP_MUL_MAT ? kq->src[1] : nullptr;
}

}  // namespace

namespace kvc {

// A ParsedState over cache cells [0, n_cells) of the capture's cache tensors: what
// llama_state_seq_get_data would write for a sequence held in exactly those cells. part: KVC_PART_K,
// KVC_PART_V, or -1 for both.
int32_t capture_rows(const kvc_capture & cap, int32_t part, int32_t seq_id, const int32_t * positions,
                     uint32_t n_cells, kvc::ParsedState & st, std::vector<std::vector<uint8_t>> & stages) {
    const int32_t n_layer = cap.n_layer;
    if (n_layer <= 0 || cap.k_cache.size() != static_cast<size_t>(n_layer)) {
        return kvc::fail(KVC_ERR_UNSUPPORTED, "the capture has not run");
    }
    if (n_cells == 0 || n_cells > static_cast<uint32_t>(std::max(cap.n_keys, 0))) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "n_cells " + std::to_string(n_cells) + " is not in [1, " +
                                                       std::to_string(cap.n_keys) + "], the capture's key columns");
    }
    st = kvc::ParsedState{};
    st.magic = kvc::kStateMagic;
    st.seq_id = seq_id;
    st.n_stream = 1;
    st.stream = 0;
    st.n_cells = n_cells;
    st.pos.assign(n_cells, 0);
    if (positions != nullptr) std::copy(positions, positions + n_cells, st.pos.begin());
    st.cell_seq.assign(n_cells, seq_id);
    st.n_layer = static_cast<uint32_t>(n_layer);
    st.v_trans = cap.v_trans[0] == 1 ? 1u : 0u;
    st.k.resize(n_layer);
    st.v.resize(n_layer);
    stages.resize(2 * static_cast<size_t>(n_layer));
    for (int32_t il = 0; il < n_layer; ++il) {
        if (part != KVC_PART_V) {
            const int32_t status = tensor_rows(cap.k_cache[il], false, n_cells, "K", il, st.k[il], stages[2 * il]);
            if (status != KVC_OK) return status;
        }
        if (part != KVC_PART_K) {
            if (cap.v_trans[il] < 0 || cap.v_trans[il] != cap.v_trans[0]) {
                return kvc::fail(KVC_ERR_UNSUPPORTED, "the V layout of layer " + std::to_string(il) + " is unknown");
            }
            const int32_t status =
                tensor_rows(cap.v_cache[il], st.v_trans != 0, n_cells, "V", il, st.v[il], stages[2 * il + 1]);
            if (status != KVC_OK) return status;
        }
    }
    return KVC_OK;
}

// A row count that holds for every later begin (kvc_capture_set_head_rows, kvc_capture_set_pooled_rows).
int32_t set_rows(kvc_capture * cap, int32_t rows, int32_t kvc_capture::*field, const char * what) {
    if (cap == nullptr || rows < 0) {
        return fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL or rows negative");
    }
    if (cap->active) {
        return fail(KVC_ERR_INVALID_ARGUMENT, std::string("the capture is active: set its ") + what + " before it begins");
    }
    cap->*field = rows;
    return static_cast<int32_t>(KVC_OK);
}

}  // namespace kvc

extern "C" {

int32_t kvc_capture_init(kvc_capture ** out) {
    return kvc::guard([&] {
        if (out == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "out is NULL");
        }
        *out = new kvc_capture();
        return static_cast<int32_t>(KVC_OK);
    });
}

void kvc_capture_free(kvc_capture * cap) { delete cap; }

int32_t kvc_capture_begin(kvc_capture * cap, int32_t n_layer, int32_t n_head, int32_t n_keys) {
    return kvc::guard([&] {
        if (cap == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL");
        }
        if (n_layer <= 0 || n_head <= 0 || n_keys <= 0) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "n_layer, n_head and n_keys must be positive");
        }
        const size_t n = static_cast<size_t>(n_layer) * n_head * n_keys;
        // attention probabilities are >= 0, so 0 is a neutral start for the max as well
        cap->max.assign(n, 0.0f);
        cap->sum.assign(n, 0.0);
        cap->n_queries.assign(n_layer, 0);
        const size_t n_head_values = cap->head_rows > 0 ? n : 0;  // kept only where asked for
        cap->head_max.assign(n_head_values, 0.0f);
        cap->head_sum.assign(n_head_values, 0.0);
        cap->head_queries.assign(n_head_values > 0 ? n_layer : 0, 0);
        cap->k_cache.assign(n_layer, nullptr);
        cap->v_cache.assign(n_layer, nullptr);
        cap->v_trans.assign(n_layer, -1);
        cap->visible.assign(n_keys, 0);
        cap->queries.assign(n_layer, {});
        cap->query_dim.assign(n_layer, 0);
        cap->query_scale.assign(n_layer, 0.0f);
        cap->queries_unusable.clear();
        cap->n_layer = n_layer;
        cap->n_head  = n_head;
        cap->n_keys  = n_keys;
        cap->error.clear();
        cap->fallback.clear();
        cap->host_bytes = 0;
        cap->n_outputs = 0;
        cap->active = true;
        return static_cast<int32_t>(KVC_OK);
    });
}

int32_t kvc_capture_end(kvc_capture * cap) {
    return kvc::guard([&] {
        if (cap == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL");
        }
        cap->active = false;
        restore_flash_kernel(*cap, nullptr);  // a graph that failed between a node's ask and its observation
        if (!cap->error.empty()) {
            return kvc::fail(KVC_ERR_CAPTURE, cap->error);
        }
        return static_cast<int32_t>(KVC_OK);
    });
}

bool kvc_capture_is_active(const kvc_capture * cap) { return cap != nullptr && cap->active; }

int32_t kvc_capture_set_recompute(kvc_capture * cap, bool recompute) {
    if (cap == nullptr) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL");
    }
    cap->recompute = recompute;
    return KVC_OK;
}

int32_t kvc_capture_set_reduce(kvc_capture * cap, int32_t where) {
    if (cap == nullptr) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL");
    }
    if (where != KVC_REDUCE_BACKEND && where != KVC_REDUCE_HOST) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "where must be KVC_REDUCE_BACKEND or KVC_REDUCE_HOST");
    }
    cap->reduce_where = where;
    return KVC_OK;
}

int32_t kvc_capture_set_n_threads(kvc_capture * cap, int32_t n_threads) {
    if (cap == nullptr || n_threads < 0) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL or n_threads is negative");
    }
    cap->n_threads = n_threads;
    cap->reducer.reset();  // its backends were started with the old count
    return KVC_OK;
}

const char * kvc_capture_get_fallback(const kvc_capture * cap) { return cap == nullptr ? "" : cap->fallback.c_str(); }

uint64_t kvc_capture_host_bytes(const kvc_capture * cap) { return cap == nullptr ? 0 : cap->host_bytes; }

int64_t kvc_capture_n_outputs(const kvc_capture * cap) { return cap == nullptr ? 0 : cap->n_outputs; }

namespace {

// max, or sum / count per layer, into dst [n_layer, n_head, n_keys]
int32_t copy_scores(const kvc_capture & cap, const std::vector<float> & max, const std::vector<double> & sum,
                    const std::vector<int64_t> & count, int32_t agg, float * dst, size_t n_values) {
    if (dst == nullptr) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "dst is NULL");
    }
    if (agg != KVC_AGG_MAX && agg != KVC_AGG_MEAN) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "agg must be KVC_AGG_MAX or KVC_AGG_MEAN");
    }
    if (n_values != max.size()) {
        return kvc::fail(KVC_ERR_INVALID_ARGUMENT,
                         "dst holds " + std::to_string(n_values) + " values, the capture " + std::to_string(max.size()));
    }
    if (agg == KVC_AGG_MAX) {
        std::copy(max.begin(), max.end(), dst);
        return static_cast<int32_t>(KVC_OK);
    }
    const size_t per_layer = static_cast<size_t>(cap.n_head) * cap.n_keys;
    for (int32_t il = 0; il < cap.n_layer; ++il) {
        const double n_q = static_cast<double>(std::max<int64_t>(1, count[il]));
        for (size_t i = il * per_layer; i < (il + 1) * per_layer; ++i) {
            dst[i] = static_cast<float>(sum[i] / n_q);
        }
    }
    return static_cast<int32_t>(KVC_OK);
}

}  // namespace

int32_t kvc_capture_get_scores(const kvc_capture * cap, int32_t agg, float * dst, size_t n_values) {
    return kvc::guard([&] {
        if (cap == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL");
        }
        return copy_scores(*cap, cap->max, cap->sum, cap->n_queries, agg, dst, n_values);
    });
}

int32_t kvc_capture_set_head_rows(kvc_capture * cap, int32_t rows) {
    return kvc::guard([&] { return kvc::set_rows(cap, rows, &kvc_capture::head_rows, "head rows"); });
}

int32_t kvc_capture_set_pooled_rows(kvc_capture * cap, int32_t rows) {
    return kvc::guard([&] { return kvc::set_rows(cap, rows, &kvc_capture::pooled_rows, "pooled rows"); });
}

int32_t kvc_capture_get_head_scores(const kvc_capture * cap, int32_t agg, float * dst, size_t n_values) {
    return kvc::guard([&] {
        if (cap == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL");
        }
        if (cap->head_max.empty()) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "the capture kept no head rows (kvc_capture_set_head_rows)");
        }
        return copy_scores(*cap, cap->head_max, cap->head_sum, cap->head_queries, agg, dst, n_values);
    });
}

int32_t kvc_capture_get_visibility(const kvc_capture * cap, int32_t * dst, size_t n_values) {
    return kvc::guard([&] {
        if (cap == nullptr || dst == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture or dst is NULL");
        }
        if (n_values != cap->visible.size()) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "dst holds " + std::to_string(n_values) + " values, the capture " +
                                                           std::to_string(cap->visible.size()));
        }
        std::copy(cap->visible.begin(), cap->visible.end(), dst);
        return static_cast<int32_t>(KVC_OK);
    });
}

int32_t kvc_capture_set_queries(kvc_capture * cap, int32_t every, int32_t n_max) {
    return kvc::guard([&] {
        if (cap == nullptr || every < 0 || n_max < 0 || (n_max > 0 && every == 0)) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL, or every / n_max negative (every >= 1 with n_max)");
        }
        if (cap->active) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "the capture is active: set the queries to keep before it begins");
        }
        cap->query_every = every;
        cap->query_max = n_max;
        return static_cast<int32_t>(KVC_OK);
    });
}

int32_t kvc_capture_get_queries(const kvc_capture * cap, int32_t il, float * dst, size_t n_values, int32_t * n_stored,
                                int32_t * head_dim, float * scale) {
    return kvc::guard([&] {
        if (cap == nullptr || il < 0 || il >= static_cast<int32_t>(cap->queries.size())) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL or layer out of range");
        }
        const auto & kept = cap->queries[il];
        const int32_t D = cap->query_dim[il];
        if (n_stored != nullptr) *n_stored = D == 0 ? 0 : static_cast<int32_t>(kept.size() / (static_cast<size_t>(D) * cap->n_head));
        if (head_dim != nullptr) *head_dim = D;
        if (scale != nullptr) *scale = cap->query_scale[il];
        if (dst == nullptr) return static_cast<int32_t>(KVC_OK);
        if (n_values != kept.size()) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "dst holds " + std::to_string(n_values) + " values, layer " +
                                                           std::to_string(il) + " kept " + std::to_string(kept.size()));
        }
        std::copy(kept.begin(), kept.end(), dst);
        return static_cast<int32_t>(KVC_OK);
    });
}

int64_t kvc_capture_n_queries(const kvc_capture * cap, int32_t il) {
    if (cap == nullptr || il < 0 || il >= static_cast<int32_t>(cap->n_queries.size())) {
        return -1;
    }
    return cap->n_queries[il];
}

bool kvc_capture_eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * cap = static_cast<kvc_capture *>(user_data);
    if (cap == nullptr || !cap->active || t == nullptr) {
        // asked: "no, nothing to observe"; observed: "go on computing"
        return !ask;
    }
    const int32_t il = softmax_layer(t);
    // with flash attention there is no kq_soft_max: the layer's output names the node to read
    const int32_t il_out = il >= 0 ? -1 : layer_of(t, kAttnOutPrefix);
    if (ask) {
        if (il_out >= 0 && il_out < cap->n_layer) {
            find_cache_tensors(*cap, t, il_out);
            skip_flash_kernel(*cap, const_cast<ggml_tensor *>(flash_attn_node(t)));
        }
        return il >= 0 || (il_out >= 0 && flash_attn_node(t) != nullptr);
    }
    const bool skipped = il_out >= 0 && restore_flash_kernel(*cap, flash_attn_node(t));
    if (cap->error.empty() && (il >= 0 || il_out >= 0)) {
        const int32_t layer = il >= 0 ? il : il_out;
        if (layer >= cap->n_layer) {
            cap->error = "attention of layer " + std::to_string(layer) + " beyond the " +
                         std::to_string(cap->n_layer) + " expected";
            return true;
        }
        try {
            if (il >= 0) {
                const ggml_tensor * q = softmax_queries(t);
                if (q == nullptr && cap->query_max > 0) cap->queries_unusable = "softcapped attention";
                keep_queries(*cap, q, op_param(t, 0), 0.0f, op_param(t, 1), il);
            } else if (const ggml_tensor * fa = flash_attn_node(t)) {
                keep_queries(*cap, fa->src[0], op_param(fa, 0), op_param(fa, 2), op_param(fa, 1), il_out);
            }
            if (!cap->error.empty()) return true;
            if (il >= 0 && cap->recompute) {
                recompute_softmax(*cap, t, il);
            } else if (il >= 0) {
                kvc::AttentionInputs in;
                in.probs = t;
                in.mask = t->src[1];
                if (!on_backend(*cap, in, il)) reduce(*cap, t, il);
            } else if (const ggml_tensor * fa = flash_attn_node(t)) {
                kvc::AttentionInputs in = flash_inputs(fa);
                if (skipped) {  // the node's output is the reduction's to write
                    in.v = fa->src[2];
                    in.out = const_cast<ggml_tensor *>(fa);
                }
                std::string why;
                if (on_backend(*cap, in, il_out, why)) {
                    cap->n_outputs += skipped;
                } else if (skipped) {
                    cap->error = "the attention of layer " + std::to_string(il_out) + " could not be computed (" +
                                 (why.empty() ? std::string("an unexpected layout") : why) + ")";
                } else {
                    reduce_flash(*cap, fa, il_out);
                }
            }
        } catch (...) {
            cap->error = "allocation failed while capturing attention";
        }
    }
    return true;
}

int32_t kvc_capture_get_norms(const kvc_capture * cap, int32_t part, int32_t n_head_kv, int32_t n_cells, float * out,
                              size_t n_values) {
    return kvc::guard([&] {
        if (cap == nullptr || n_cells <= 0) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture is NULL or n_cells is not positive");
        }
        if (part != KVC_PART_K && part != KVC_PART_V) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "part must be KVC_PART_K or KVC_PART_V");
        }
        static thread_local std::vector<std::vector<uint8_t>> stages;
        kvc::ParsedState st;
        const int32_t status = kvc::capture_rows(*cap, part, 0, nullptr, static_cast<uint32_t>(n_cells), st, stages);
        if (status != KVC_OK) return status;
        return kvc::row_norms(st, part, n_head_kv, out, n_values);
    });
}

}  // extern "C"
