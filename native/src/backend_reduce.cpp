// The attention capture's reduction as a ggml graph on the backend that holds the layer's tensors.
//
// Flash attention off: llama.cpp's own probabilities "kq_soft_max-{il}" are pooled in place. On: the
// probabilities are recomputed from the flash-attention node's inputs the way the non-flash path
// computes them, mul_mat(k, q) (GQA by broadcast) -> [softcap: tanh] -> soft_max_ext(mask, scale,
// max_bias) [+ sinks], in blocks of queries so that no more than kBlockBytes of probabilities exist
// at once. Each block is pooled over its queries (max, sum) and the blocks are folded in the graph,
// so the host receives 2 x [n_kv, n_head] floats per layer and ubatch (+ [n_kv] for layer 0's mask).
// The pooling is ggml's POOL_2D where the backend is a device, and a ggml custom op on all threads on
// the CPU (whose POOL_2D runs on one thread). On the CPU the recomputed probabilities never exist as a
// tensor: one custom op takes each block's q.k rows, softmaxes each row where it sits in the core's
// cache and pools it (soft_max_ext's output written and read again cost a third of the recompute).
//
// The graph reads llama.cpp's tensors through aliases: tensors of our own context pointing at the
// same buffer and bytes, with no source nodes, so the scheduler's graph is never pulled in.
#include "backend_reduce.h"

#include "capture.h"
#include "parallel.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <utility>
#include <vector>

namespace kvc {

namespace {

// Upper bound on one block of probabilities [n_kv, block, n_head] f32. KVC_REDUCE_BLOCK_BYTES
// overrides it (tests use a small value to exercise the folding of several blocks).
size_t block_bytes() {
    const char * env = std::getenv("KVC_REDUCE_BLOCK_BYTES");
    const long long v = env != nullptr ? std::strtoll(env, nullptr, 10) : 0;
    return v > 0 ? static_cast<size_t>(v) : size_t{64} << 20;
}

// Tests: KVC_REDUCE_DENY_OP="SOFT_MAX,POOL_2D" makes the named ops count as unsupported everywhere,
// the way a backend without them would.
bool denied(const char * op) {
    const char * env = std::getenv("KVC_REDUCE_DENY_OP");
    if (env == nullptr || *env == '\0') return false;
    const std::string list = std::string(",") + env + ",";
    return list.find(std::string(",") + op + ",") != std::string::npos;
}

// The CPU backend's pooling, a ggml custom op over all its threads (ggml's POOL_2D runs on one):
// dst [n_kv, 2, n_head] = (max, sum) over the queries of src[0] [n_kv, n_q, n_head], folded into
// src[1] (the previous block's dst) when there is one. Each thread owns a range of key columns.
void pool_queries(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * p = dst->src[0];
    const ggml_tensor * prev = dst->src[1];
    const int64_t n_kv = p->ne[0], n_q = p->ne[1], n_head = p->ne[2];
    const int64_t per = (n_kv + nth - 1) / nth, j0 = std::min(n_kv, ith * per), j1 = std::min(n_kv, j0 + per);
    if (j0 >= j1) return;
    for (int64_t h = 0; h < n_head; ++h) {
        float * mx = reinterpret_cast<float *>(static_cast<char *>(dst->data) + h * dst->nb[2]);
        float * sm = reinterpret_cast<float *>(static_cast<char *>(dst->data) + h * dst->nb[2] + dst->nb[1]);
        if (prev != nullptr) {
            const char * from = static_cast<const char *>(prev->data) + h * prev->nb[2];
            std::memcpy(mx + j0, reinterpret_cast<const float *>(from) + j0, (j1 - j0) * sizeof(float));
            std::memcpy(sm + j0, reinterpret_cast<const float *>(from + prev->nb[1]) + j0, (j1 - j0) * sizeof(float));
        } else {  // probabilities are >= 0: 0 is a neutral start for the max as well
            std::fill(mx + j0, mx + j1, 0.0f);
            std::fill(sm + j0, sm + j1, 0.0f);
        }
        for (int64_t t = 0; t < n_q; ++t) {
            const float * row = reinterpret_cast<const float *>(static_cast<const char *>(p->data) + t * p->nb[1] +
                                                                h * p->nb[2]);
            for (int64_t j = j0; j < j1; ++j) {
                mx[j] = std::max(mx[j], row[j]);
                sm[j] += row[j];
            }
        }
    }
}

// Where the compiler can make an AVX2 copy of a function beside the baseline one (chosen at load time).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KVC_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define KVC_AVX2_CLONE
#endif

// 8-float vectors (two SSE registers in the baseline copy, one AVX one in the AVX2 copy). Their helpers are
// always inlined, so no call passes one by value: GCC's note that such calls' ABI differs without AVX (given
// for the whole file, at its end) is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline f32x8 load8(const float * p) {
    f32x8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
__attribute__((always_inline)) inline void store8(float * p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// exp(x) for x <= 0 (a logit minus its row's max), 0 below -87 (and for -inf: masked keys), to ~2 ulp:
// Cephes' expf, exp(r) * 2^n with |r| <= ln 2 / 2.
__attribute__((always_inline)) inline f32x8 exp8_nonpositive(f32x8 x) {
    const i32x8 dead = x < -87.0f;
    x = dead ? f32x8{} - 87.0f : x;
    const i32x8 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x8);  // round(x / ln 2), x <= 0
    const f32x8 nf = __builtin_convertvector(n, f32x8);
    const f32x8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    f32x8 p = 1.9875691500e-4f + f32x8{};
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const f32x8 y = (p * r * r + r + 1.0f) * (f32x8)((n + 127) << 23);
    return dead ? f32x8{} : y;
}

inline float exp_nonpositive(float x) {
    f32x8 v{};
    v[0] = x;
    return exp8_nonpositive(v)[0];
}

// One query row of one head: p = softmax(scale * kq + mask [, sink]) over its n keys, folded into the
// running (mx, sm) unless mx is nullptr, and written to probs unless that is nullptr (a row that sees no
// key: zeros). x: n rounded up to 8 floats of scratch.
KVC_AVX2_CLONE
void fold_softmax_row(const float * kq, const float * mask, float scale, const float * sink, int64_t n, float * x,
                      float * mx, float * sm, float * probs) {
    const int64_t n8 = n / 8 * 8;
    f32x8 vmax = f32x8{} - INFINITY;
    for (int64_t j = 0; j < n8; j += 8) {
        f32x8 v = load8(kq + j) * scale;
        if (mask != nullptr) v += load8(mask + j);
        store8(x + j, v);
        vmax = v > vmax ? v : vmax;
    }
    float M = sink != nullptr ? *sink : -INFINITY;
    for (int k = 0; k < 8; ++k) M = std::max(M, vmax[k]);
    for (int64_t j = n8; j < n; ++j) {
        x[j] = kq[j] * scale + (mask != nullptr ? mask[j] : 0.0f);
        M = std::max(M, x[j]);
    }
    if (M == -INFINITY) {  // a row that sees nothing adds nothing (as on the host)
        if (probs != nullptr) std::fill_n(probs, n, 0.0f);
        return;
    }
    f32x8 vsum{};
    for (int64_t j = 0; j < n8; j += 8) {
        const f32x8 e = exp8_nonpositive(load8(x + j) - M);
        store8(x + j, e);
        vsum += e;
    }
    float Z = sink != nullptr ? exp_nonpositive(*sink - M) : 0.0f;
    for (int k = 0; k < 8; ++k) Z += vsum[k];
    for (int64_t j = n8; j < n; ++j) {
        x[j] = exp_nonpositive(x[j] - M);
        Z += x[j];
    }
    const float inv = 1.0f / Z;
    if (probs != nullptr) {
        for (int64_t j = 0; j < n8; j += 8) store8(probs + j, load8(x + j) * inv);
        for (int64_t j = n8; j < n; ++j) probs[j] = x[j] * inv;
    }
    if (mx == nullptr) return;
    for (int64_t j = 0; j < n8; j += 8) {
        const f32x8 p = load8(x + j) * inv, m = load8(mx + j);
        store8(mx + j, p > m ? p : m);
        store8(sm + j, load8(sm + j) + p);
    }
    for (int64_t j = n8; j < n; ++j) {
        const float p = x[j] * inv;
        mx[j] = std::max(mx[j], p);
        sm[j] += p;
    }
}

struct SoftmaxPool {
    float scale = 1.0f;
    bool mask = false, sinks = false;
    bool pool = true;          // false: the rows are softmaxed only (rows past the pooled ones)
    bool write_probs = false;  // true: each row's probabilities replace its q.k in src[0] (for p.v after)
    int64_t n_parts = 1;
    float * scratch = nullptr;  // per part: a row's logits (n_kv rounded up to 8) and its mask as f32 (n_kv)
};

// Floats of a row's logits in SoftmaxPool::scratch: whole 8-float vectors.
int64_t logits_floats(int64_t n_kv) { return (n_kv + 7) / 8 * 8; }
// Floats of SoftmaxPool::scratch one part needs for rows of n_kv keys: the logits, then the mask row.
size_t scratch_per_part(int64_t n_kv) { return static_cast<size_t>(logits_floats(n_kv) + n_kv); }

// The CPU's probabilities, softmaxed and pooled in one op: dst [n_kv, 2, n_head, n_parts] = (max, sum) of
// softmax(scale * src[0] + mask) over part p's share of the queries of src[0] [n_kv, n_q, n_head] (q.k),
// then src[1] the mask rows [n_kv, >= n_q] if any, then the sinks [n_head] if any. Each thread owns whole
// parts (all heads of a range of queries), so that each mask row is read once. With write_probs the
// probabilities are written over src[0]'s rows: the graph orders the op that reads them after this one.
void softmax_pool_queries(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto & par = *static_cast<const SoftmaxPool *>(userdata);
    ggml_tensor * kq = dst->src[0];
    const ggml_tensor * mask = par.mask ? dst->src[1] : nullptr;
    const ggml_tensor * sinks = par.sinks ? dst->src[par.mask ? 2 : 1] : nullptr;
    const int64_t n_kv = kq->ne[0], n_q = kq->ne[1], n_head = kq->ne[2];
    for (int64_t part = ith; part < par.n_parts; part += nth) {
        float * logits = par.scratch + part * scratch_per_part(n_kv);
        float * mask_row = logits + logits_floats(n_kv);
        char * out = static_cast<char *>(dst->data) + part * dst->nb[3];
        for (int64_t h = 0; h < n_head; ++h) {  // probabilities are >= 0: 0 is a neutral start for the max too
            std::fill_n(reinterpret_cast<float *>(out + h * dst->nb[2]), 2 * n_kv, 0.0f);
        }
        const int64_t t0 = n_q * part / par.n_parts, t1 = n_q * (part + 1) / par.n_parts;
        for (int64_t t = t0; t < t1; ++t) {
            const float * m = nullptr;
            if (mask != nullptr) {
                const char * row = static_cast<const char *>(mask->data) + t * mask->nb[1];
                if (mask->type == GGML_TYPE_F16) {
                    ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(row), mask_row, n_kv);
                    m = mask_row;
                } else {
                    m = reinterpret_cast<const float *>(row);
                }
            }
            for (int64_t h = 0; h < n_head; ++h) {
                float * mx = par.pool ? reinterpret_cast<float *>(out + h * dst->nb[2]) : nullptr;
                float * row = reinterpret_cast<float *>(static_cast<char *>(kq->data) + t * kq->nb[1] + h * kq->nb[2]);
                const float * sink = sinks != nullptr ? static_cast<const float *>(sinks->data) + h : nullptr;
                fold_softmax_row(row, m, par.scale, sink, n_kv, logits, mx, mx != nullptr ? mx + n_kv : nullptr,
                                 par.write_probs ? row : nullptr);
            }
        }
    }
}

// dst [n_kv, 2, n_head] = the (max, sum) of src[0]'s parts [n_kv, 2, n_head, n_parts], folded into src[1]
// (the previous block's dst) when there is one. Each thread owns a range of key columns.
void fold_parts(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * parts = dst->src[0];
    const ggml_tensor * prev = dst->src[1];
    const int64_t n_kv = parts->ne[0], n_head = parts->ne[2], n_parts = parts->ne[3];
    const int64_t per = (n_kv + nth - 1) / nth, j0 = std::min(n_kv, ith * per), j1 = std::min(n_kv, j0 + per);
    if (j0 >= j1) return;
    auto max_of = [](const ggml_tensor * t, int64_t h, int64_t p) {  // (max, then sum at + nb[1]) of head h, part p
        return static_cast<char *>(t->data) + h * t->nb[2] + p * t->nb[3];
    };
    for (int64_t h = 0; h < n_head; ++h) {
        float * mx = reinterpret_cast<float *>(max_of(dst, h, 0));
        float * sm = reinterpret_cast<float *>(max_of(dst, h, 0) + dst->nb[1]);
        // start from the previous block's (max, sum), or else from part 0, and fold the remaining parts in
        const ggml_tensor * from = prev != nullptr ? prev : parts;
        const char * start = max_of(from, h, 0);
        std::memcpy(mx + j0, reinterpret_cast<const float *>(start) + j0, (j1 - j0) * sizeof(float));
        std::memcpy(sm + j0, reinterpret_cast<const float *>(start + from->nb[1]) + j0, (j1 - j0) * sizeof(float));
        for (int64_t p = prev != nullptr ? 0 : 1; p < n_parts; ++p) {
            const float * pmx = reinterpret_cast<const float *>(max_of(parts, h, p));
            const float * psm = reinterpret_cast<const float *>(max_of(parts, h, p) + parts->nb[1]);
            for (int64_t j = j0; j < j1; ++j) {
                mx[j] = std::max(mx[j], pmx[j]);
                sm[j] += psm[j];
            }
        }
    }
}

// A tensor of ctx that reads rows [row0, row0 + n_rows) (of dimension `dim`) of t where t's bytes are.
ggml_tensor * alias(ggml_context * ctx, const ggml_tensor * t, int64_t row0 = 0, int64_t n_rows = -1, int dim = 1) {
    int64_t ne[4] = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]};
    ne[dim] = n_rows < 0 ? t->ne[dim] - row0 : n_rows;
    ggml_tensor * a = ggml_new_tensor(ctx, t->type, 4, ne);
    std::memcpy(a->nb, t->nb, sizeof a->nb);
    a->data = static_cast<char *>(t->data) + row0 * t->nb[dim];
    a->buffer = t->buffer;
    return a;
}

// The device whose buffer holds t: host buffers (llama.cpp's CPU buffer type names no device)
// are the CPU device's.
ggml_backend_dev_t device_of(const ggml_tensor * t) {
    if (t->buffer == nullptr) return nullptr;
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
    if (dev == nullptr && ggml_backend_buffer_is_host(t->buffer)) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    }
    return dev;
}

// Value types whose transposed copy to f32 (ggml_cpy of a non-contiguous view) every backend's CPY handles.
bool copyable_values(const ggml_tensor * v) {
    return v->type == GGML_TYPE_F16 || v->type == GGML_TYPE_F32 || v->type == GGML_TYPE_BF16;
}

}  // namespace

struct BackendReducer::Impl {
    struct Device {
        ggml_backend_dev_t dev = nullptr;
        ggml_backend_t backend = nullptr;
        ggml_gallocr_t alloc = nullptr;
        std::string lacks;  // what this backend cannot run; set once, then the host reduces
    };
    std::vector<Device> devices;
    std::vector<uint8_t> meta;  // tensor and graph metadata of one reduction graph
    std::vector<float> result;
    std::vector<float> scratch;  // the fused softmax-and-pool op's rows (SoftmaxPool::scratch)

    ~Impl() {
        for (auto & d : devices) {
            if (d.alloc != nullptr) ggml_gallocr_free(d.alloc);
            if (d.backend != nullptr) ggml_backend_free(d.backend);
        }
    }

    Device * device(ggml_backend_dev_t dev, int n_threads, std::string & why) {
        for (auto & d : devices) {
            if (d.dev == dev) return &d;
        }
        Device d;
        d.dev = dev;
        d.backend = start_backend(dev, n_threads);
        if (d.backend == nullptr) {
            why = std::string("the ") + ggml_backend_dev_name(dev) + " device could not start a backend";
            return nullptr;
        }
        d.alloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(d.backend));
        devices.push_back(d);
        return &devices.back();
    }
};

ggml_backend_t start_backend(ggml_backend_dev_t dev, int n_threads) {
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    if (backend == nullptr) return nullptr;
    if (ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev)) {
        auto set_threads = reinterpret_cast<ggml_backend_set_n_threads_t>(
            ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"));
        if (set_threads != nullptr) set_threads(backend, n_threads);
    }
    return backend;
}

BackendReducer::BackendReducer() : impl_(std::make_unique<Impl>()) {}
BackendReducer::~BackendReducer() = default;

namespace {

// Whether the backend graph can read `in`, and on which device (ggml asserts the layouts its ops accept:
// check first, never abort). False with `why` naming the limit, or with `why` empty where the shape is
// not the backend's limit (the host path reports it).
bool usable(const kvc_capture & cap, const AttentionInputs & in, ggml_backend_dev_t & dev, std::string & why) {
    const bool flash = in.probs == nullptr;
    const ggml_tensor * held = flash ? in.k : in.probs;  // where the work happens
    // shapes: the probabilities are [n_kv, n_tok, n_head]
    const int64_t n_kv = flash ? in.k->ne[1] : in.probs->ne[0];
    const int64_t n_tok = flash ? in.q->ne[1] : in.probs->ne[1];
    const int64_t n_head = flash ? in.q->ne[2] : in.probs->ne[2];
    const ggml_tensor * mask = in.mask;
    why.clear();
    if (n_head != cap.n_head || held->ne[3] != 1 || (flash ? in.q->ne[3] : in.probs->ne[3]) != 1 ||
        (!flash && in.probs->type != GGML_TYPE_F32)) {
        return false;
    }
    dev = device_of(held);
    if (dev == nullptr) {
        why = "its tensors are on a buffer of no known device";
        return false;
    }
    for (const ggml_tensor * t : {in.q, in.k, in.mask, in.sinks, in.probs, in.v, static_cast<const ggml_tensor *>(in.out)}) {
        if (t != nullptr && (t->data == nullptr || device_of(t) != dev)) {
            why = "its tensors are on more than one device";
            return false;
        }
    }
    if (flash && (in.k->ne[0] != in.q->ne[0] || in.q->type != GGML_TYPE_F32 || in.q->nb[0] != sizeof(float) ||
                  in.k->nb[0] != ggml_type_size(in.k->type) || in.k->nb[1] < in.k->nb[0] ||
                  n_head % in.k->ne[2] != 0)) {
        why = "flash attention inputs of an unexpected layout";
        return false;
    }
    if (!flash && !ggml_is_contiguous(in.probs)) {
        why = "attention probabilities that are not contiguous";
        return false;
    }
    // one mask plane, so that its row ranges stay contiguous (soft_max_ext requires it)
    if (mask != nullptr && (!ggml_is_contiguous(mask) || mask->ne[0] != n_kv || mask->ne[1] < n_tok ||
                            (mask->type != GGML_TYPE_F16 && mask->type != GGML_TYPE_F32) || mask->ne[2] != 1 ||
                            mask->ne[3] != 1)) {
        why = "an attention mask of an unexpected layout";
        return false;
    }
    if (in.sinks != nullptr && (in.sinks->type != GGML_TYPE_F32 || in.sinks->ne[0] != n_head)) {
        why = "attention sinks of an unexpected layout";
        return false;
    }
    if (in.out != nullptr) {  // the flash node's output [DV, n_head, n_tok], from values [DV, n_kv, n_head_kv]
        const ggml_tensor * v = in.v;
        if (!flash || v == nullptr || !copyable_values(v) || v->nb[0] != ggml_type_size(v->type) ||
            v->ne[1] != n_kv || v->ne[2] != in.k->ne[2] || v->ne[3] != 1 || in.out->type != GGML_TYPE_F32 ||
            !ggml_is_contiguous(in.out) || in.out->ne[0] != v->ne[0] || in.out->ne[1] != n_head ||
            in.out->ne[2] != n_tok || in.out->ne[3] != 1) {
            why = "flash attention values or output of an unexpected layout";
            return false;
        }
    }
    return true;
}

}  // namespace

bool BackendReducer::writes_output(const kvc_capture & cap, const AttentionInputs & in) {
    if (in.probs != nullptr || in.v == nullptr || in.out == nullptr || in.max_bias != 0.0f) return false;
    // Tests: KVC_KEEP_FLASH_KERNEL=1 lets ggml's kernel compute the output, so that a host reduction and a
    // backend one see the same activations
    const char * keep = std::getenv("KVC_KEEP_FLASH_KERNEL");
    if (keep != nullptr && *keep != '\0' && *keep != '0') return false;
    // the ops of the graph that computes the output (the tests deny them to take the other path)
    for (const char * op : {"CUSTOM", "MUL_MAT", "CPY", "TANH", "SCALE"}) {
        if (denied(op)) return false;
    }
    ggml_backend_dev_t dev = nullptr;
    std::string why;
    if (!usable(cap, in, dev, why) || ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) return false;
    for (const auto & d : impl_->devices) {
        if (d.dev == dev && !d.lacks.empty()) return false;
    }
    return true;
}

bool BackendReducer::reduce(kvc_capture & cap, const AttentionInputs & in, int32_t il, std::string & why) {
    const bool flash = in.probs == nullptr;
    const int64_t n_kv = flash ? in.k->ne[1] : in.probs->ne[0];
    const int64_t n_tok = flash ? in.q->ne[1] : in.probs->ne[1];
    const int64_t n_head = flash ? in.q->ne[2] : in.probs->ne[2];
    const ggml_tensor * mask = in.mask;
    ggml_backend_dev_t dev = nullptr;
    if (!usable(cap, in, dev, why)) return false;
    const bool output = in.out != nullptr;

    const int64_t n_rows = pooled_rows_of(cap, il, n_tok);  // rows [n_rows, n_tok): padding, not pooled
    if (n_rows == 0 && !output) return true;                // nothing to pool in this ubatch

    Impl & m = *impl_;
    const int n_threads = static_cast<int>(cap.n_threads > 0 ? cap.n_threads : max_threads());
    Impl::Device * d = m.device(dev, n_threads, why);
    if (d == nullptr) return false;
    if (!d->lacks.empty()) {
        why = d->lacks;
        return false;
    }

    // query blocks of recomputed probabilities: at most block_bytes() at once. llama.cpp's own
    // probabilities exist already and are pooled whole (one contiguous tensor). The capture's head rows
    // (kvc_capture_set_head_rows) among this ubatch's rows are a range of their own, pooled apart; rows past
    // the pooled ones (kvc_capture_set_pooled_rows) are computed only where the output is (`output`).
    const int64_t n_computed = output ? n_tok : n_rows;
    const size_t per_query = static_cast<size_t>(n_kv) * n_head * sizeof(float);
    const int64_t block =
        flash ? std::clamp<int64_t>(static_cast<int64_t>(block_bytes() / per_query), 1, n_computed) : n_rows;
    const int64_t n_head_rows = head_rows_of(cap, il, n_rows);
    struct Range {
        int64_t r0, r1;
        bool pool;
    };
    std::vector<Range> ranges;  // the head rows first, if any, then the other pooled rows, then the padding
    if (n_head_rows > 0) ranges.push_back({0, n_head_rows, true});
    if (n_head_rows < n_rows) ranges.push_back({n_head_rows, n_rows, true});
    if (n_rows < n_computed) ranges.push_back({n_rows, n_computed, false});
    const int64_t n_block = (n_computed + block - 1) / block + static_cast<int64_t>(ranges.size()) - 1;
    const bool visibility = il == 0 && n_rows > 0;

    const size_t n_tensors = 16 * static_cast<size_t>(n_block) + 32;
    m.meta.resize(n_tensors * ggml_tensor_overhead() + ggml_graph_overhead_custom(n_tensors, false));
    ggml_init_params params = {m.meta.size(), m.meta.data(), /*no_alloc=*/true};
    ggml_context * ctx = ggml_init(params);
    if (ctx == nullptr) {
        why = "ggml could not make a graph context";
        return false;
    }
    struct CtxFree {
        ggml_context * c;
        ~CtxFree() { ggml_free(c); }
    } ctx_free{ctx};
    // Nodes are added in the order they must run: the fused op that writes a block's probabilities over
    // its q.k comes before the p.v that reads them (no edge between the two says so).
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_tensors, false);

    ggml_tensor * k = flash ? alias(ctx, in.k) : nullptr;
    ggml_tensor * sinks = in.sinks != nullptr ? alias(ctx, in.sinks) : nullptr;
    // CPU: ggml's POOL_2D runs on one thread, so the CPU pools with pool_queries; other backends with
    // POOL_2D (max, and mean x queries) per block, the blocks folded by one more POOL_2D and ADDs
    const bool cpu_pool = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU && !denied("CUSTOM");
    // CPU, flash: the recomputed rows softmaxed and pooled in one op (ALiBi keeps soft_max_ext)
    const bool fused_softmax = flash && cpu_pool && in.max_bias == 0.0f;
    if (output && !fused_softmax) {  // writes_output said yes: not reached
        why = "the attention output is computed on the CPU only";
        return false;
    }
    // the output's values as f32 [n_kv, DV, n_head_kv], the rows p.v multiplies (GQA by broadcast, as for q.k)
    ggml_tensor * v_rows = nullptr;
    if (output) {
        const ggml_tensor * v = in.v;
        v_rows = ggml_cpy(ctx, ggml_transpose(ctx, alias(ctx, v)),
                          ggml_new_tensor_3d(ctx, GGML_TYPE_F32, v->ne[1], v->ne[0], v->ne[2]));
    }
    std::deque<SoftmaxPool> fused;  // the fused ops' parameters: alive until the graph has run
    if (fused_softmax) m.scratch.resize(static_cast<size_t>(n_threads) * scratch_per_part(n_kv));  // blocks run in turn
    // [n_kv, 2, n_head]: (max, sum) over the query rows [r0, r1) (nullptr where they are not pooled)
    auto pool_rows = [&](int64_t r0, int64_t r1, bool pool) -> ggml_tensor * {
        ggml_tensor * acc = nullptr;      // cpu_pool: (max, sum) over the blocks so far
        ggml_tensor * max_all = nullptr;  // [n_kv, blocks, n_head]: each block's max over its queries
        ggml_tensor * sum_all = nullptr;  // [n_kv, 1, n_head]: sum over all queries
        int nb = 0;
        for (int64_t t0 = r0; t0 < r1; t0 += block, ++nb) {
            const int64_t nt = std::min(block, r1 - t0);
            ggml_tensor * p;
            if (flash) {
                ggml_tensor * kq = ggml_mul_mat(ctx, k, alias(ctx, in.q, t0, nt));  // [n_kv, nt, n_head]
                float scale = in.scale;
                if (in.softcap != 0.0f) {  // softcap * tanh(scale * q.k / softcap): the softmax scales by softcap
                    kq = ggml_tanh(ctx, ggml_scale(ctx, kq, in.scale / in.softcap));
                    scale = in.softcap;
                }
                ggml_tensor * mask_rows = mask != nullptr ? alias(ctx, mask, t0) : nullptr;
                if (fused_softmax) {
                    SoftmaxPool & par = fused.emplace_back();
                    par.scale = scale;
                    par.mask = mask_rows != nullptr;
                    par.sinks = sinks != nullptr;
                    par.pool = pool;
                    par.write_probs = output;
                    par.n_parts = n_threads;
                    par.scratch = m.scratch.data();
                    ggml_tensor * args[3] = {kq, par.mask ? mask_rows : sinks, sinks};
                    ggml_tensor * parts = ggml_custom_4d(ctx, GGML_TYPE_F32, n_kv, 2, n_head, par.n_parts, args,
                                                         1 + par.mask + par.sinks, softmax_pool_queries,
                                                         GGML_N_TASKS_MAX, &par);
                    ggml_build_forward_expand(gf, parts);
                    if (pool) {
                        ggml_tensor * fold[2] = {parts, acc};
                        acc = ggml_custom_4d(ctx, GGML_TYPE_F32, n_kv, 2, n_head, 1, fold, acc != nullptr ? 2 : 1,
                                             fold_parts, GGML_N_TASKS_MAX, nullptr);
                        ggml_build_forward_expand(gf, acc);
                    }
                    if (output) {  // [DV, nt, n_head] -> the output's rows [DV, n_head, nt]
                        ggml_tensor * o = ggml_permute(ctx, ggml_mul_mat(ctx, v_rows, kq), 0, 2, 1, 3);
                        ggml_build_forward_expand(gf, ggml_cpy(ctx, o, alias(ctx, in.out, t0, nt, 2)));
                    }
                    continue;
                }
                p = ggml_soft_max_ext(ctx, kq, mask_rows, scale, in.max_bias);
                ggml_soft_max_add_sinks(p, sinks);
            } else {
                p = alias(ctx, in.probs, t0, nt);
            }
            if (cpu_pool) {
                ggml_tensor * args[2] = {p, acc};
                acc = ggml_custom_4d(ctx, GGML_TYPE_F32, n_kv, 2, n_head, 1, args, acc != nullptr ? 2 : 1,
                                     pool_queries, GGML_N_TASKS_MAX, nullptr);
                continue;
            }
            const int q = static_cast<int>(nt);
            ggml_tensor * mx = ggml_pool_2d(ctx, p, GGML_OP_POOL_MAX, 1, q, 1, q, 0, 0);
            ggml_tensor * sm = ggml_scale(ctx, ggml_pool_2d(ctx, p, GGML_OP_POOL_AVG, 1, q, 1, q, 0, 0),
                                          static_cast<float>(nt));
            max_all = max_all == nullptr ? mx : ggml_concat(ctx, max_all, mx, 1);
            sum_all = sum_all == nullptr ? sm : ggml_add(ctx, sum_all, sm);
        }
        if (!pool) return nullptr;
        if (!cpu_pool) {
            ggml_tensor * max_out = nb == 1 ? max_all : ggml_pool_2d(ctx, max_all, GGML_OP_POOL_MAX, 1, nb, 1, nb, 0, 0);
            acc = ggml_concat(ctx, max_out, sum_all, 1);
        }
        ggml_set_output(acc);  // read after the graph: its memory is not reused for later nodes
        ggml_build_forward_expand(gf, acc);
        return acc;
    };
    std::vector<ggml_tensor *> accs;  // one per pooled range
    for (const Range & r : ranges) {
        if (ggml_tensor * acc = pool_rows(r.r0, r.r1, r.pool)) accs.push_back(acc);
    }
    ggml_tensor * seen = nullptr;  // [n_kv, 1]: query rows whose mask lets them see each cell
    if (visibility && mask != nullptr) {
        // -inf (hidden) -> 0, any finite value -> 1, summed over the ubatch's rows
        ggml_tensor * rows = ggml_cast(ctx, alias(ctx, mask, 0, n_rows), GGML_TYPE_F32);
        ggml_tensor * open = ggml_step(ctx, ggml_scale_bias(ctx, rows, 1.0f, 1e30f));
        seen = ggml_scale(ctx, ggml_pool_2d(ctx, open, GGML_OP_POOL_AVG, 1, static_cast<int>(n_rows), 1,
                                            static_cast<int>(n_rows), 0, 0),
                          static_cast<float>(n_rows));
        ggml_build_forward_expand(gf, seen);
    }

    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        const ggml_tensor * node = ggml_graph_node(gf, i);
        if (denied(ggml_op_desc(node)) || !ggml_backend_supports_op(d->backend, node)) {
            d->lacks = std::string("the ") + ggml_backend_name(d->backend) + " backend lacks " + ggml_op_desc(node);
            why = d->lacks;
            return false;
        }
    }
    if (!ggml_gallocr_alloc_graph(d->alloc, gf)) {
        why = "no memory for the reduction graph on " + std::string(ggml_backend_name(d->backend));
        return false;
    }
    if (ggml_backend_graph_compute(d->backend, gf) != GGML_STATUS_SUCCESS) {
        why = std::string("the ") + ggml_backend_name(d->backend) + " backend failed to compute the reduction";
        return false;
    }

    // [n_kv, 2, n_head] per range (+ [n_kv]) floats to the host
    const size_t plane = static_cast<size_t>(n_kv) * n_head;
    m.result.resize(2 * plane * accs.size() + (seen != nullptr ? n_kv : 0));
    for (size_t r = 0; r < accs.size(); ++r) {
        ggml_backend_tensor_get(accs[r], m.result.data() + 2 * plane * r, 0, 2 * plane * sizeof(float));
    }
    float * seen_counts = m.result.data() + 2 * plane * accs.size();
    if (seen != nullptr) ggml_backend_tensor_get(seen, seen_counts, 0, n_kv * sizeof(float));
    cap.host_bytes += m.result.size() * sizeof(float);

    const int64_t n_keys = std::min<int64_t>(n_kv, cap.n_keys);
    for (size_t r = 0; r < accs.size(); ++r) {
        const bool head = ranges[r].r0 < n_head_rows;
        for (int64_t h = 0; h < n_head; ++h) {
            const size_t at = (static_cast<size_t>(il) * cap.n_head + h) * cap.n_keys;
            const float * mx = m.result.data() + 2 * plane * r + 2 * h * n_kv;  // acc [n_kv, 2, n_head]
            const float * sm = mx + n_kv;
            fold_max_sum(cap.max.data() + at, cap.sum.data() + at, mx, sm, n_keys);
            if (head) fold_max_sum(cap.head_max.data() + at, cap.head_sum.data() + at, mx, sm, n_keys);
        }
    }
    if (seen != nullptr) {  // (no mask: nothing to count, as on the host)
        for (int64_t j = 0; j < n_keys; ++j) {
            cap.visible[j] += static_cast<int32_t>(std::lround(seen_counts[j]));
        }
    }
    if (n_head_rows > 0) cap.head_queries[il] += n_head_rows;
    cap.n_queries[il] += n_rows;
    return true;
}

}  // namespace kvc
