// Value refit of composed cells (kvc_refit): for each (layer, kv head) the C kept cells' values are
// replaced by the ridge least-squares solution V' of
//     min || softmax(s Q K_S^T) V' - softmax(s Q K^T) V ||^2 + lambda || V' - V_S ||^2
// over the capture's reference queries Q (every query head of the kv head's GQA group): attention over
// the kept keys then reproduces, for those queries, what attention over all the context's keys gave,
// so what a dropped token carried is folded into the kept values (least squares on V as Attention
// Matching, arXiv 2602.16284, fits compact caches; the keys and their cells stay as selected).
//
// The products over all n keys run as one ggml graph per layer on the CPU backend (its threads); the
// C x C (or, with fewer query rows than cells, the dual M x M) systems are solved on the host.
#include "refit.h"

#include "backend_reduce.h"
#include "capture.h"
#include "parallel.h"
#include "state.h"
#include "status.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace kvc {

namespace {

// Rows [0, n_cells) of one layer's K or V as f32 [n_cells, n_embd].
void read_rows(const TensorRows & t, bool transposed, uint32_t n_cells, std::vector<float> & out) {
    out.resize(static_cast<size_t>(n_cells) * t.n_embd);
    if (!transposed) {
        for (uint32_t c = 0; c < n_cells; ++c) to_f32(t.type, t.data + c * t.stride, out.data() + c * t.n_embd, t.n_embd);
        return;
    }
    std::vector<float> row(n_cells);
    for (int64_t e = 0; e < t.n_embd; ++e) {
        to_f32(t.type, t.data + e * t.stride, row.data(), n_cells);
        for (uint32_t c = 0; c < n_cells; ++c) out[c * t.n_embd + e] = row[c];
    }
}

// Writes head g's slice [g*D, (g+1)*D) of cell c's V (f32 src) in the layer's type, in place.
void write_value(const TensorRows & t, bool transposed, uint32_t c, int64_t g, int64_t D, const float * src) {
    const auto type = static_cast<ggml_type>(t.type);
    uint8_t * data = const_cast<uint8_t *>(t.data);  // the composed buffer is ours to write
    if (transposed) {  // one element per row of cells (f32/f16/bf16)
        for (int64_t e = 0; e < D; ++e) {
            uint8_t * dst = data + (g * D + e) * t.stride + c * t.row_size;
            ggml_quantize_chunk(type, src + e, dst, 0, 1, 1, nullptr);
        }
        return;
    }
    // a head's slice starts on a block boundary (checked by the caller): only its blocks are re-encoded
    uint8_t * row = data + static_cast<size_t>(c) * t.stride + ggml_row_size(type, g * D);
    ggml_quantize_chunk(type, src, row, 0, 1, D, nullptr);
}

// Solves (G + mu I) X = B in place for X (G symmetric positive semi-definite [m x m] row-major, B [m x d]):
// Cholesky G + mu I = U^T U, upper U row-major, then two triangular solves. Rows are updated with
// contiguous axpys (vectorised), accumulated in double where a row is finished.
bool solve_spd(std::vector<double> & G, int64_t m, double mu, std::vector<double> & B, int64_t d) {
    for (int64_t i = 0; i < m; ++i) G[i * m + i] += mu;
    for (int64_t k = 0; k < m; ++k) {
        double * rk = G.data() + k * m;
        if (!(rk[k] > 0.0)) return false;
        const double ukk = std::sqrt(rk[k]);
        for (int64_t j = k; j < m; ++j) rk[j] /= ukk;
        for (int64_t i = k + 1; i < m; ++i) {
            const double uki = rk[i];
            if (uki == 0.0) continue;
            double * ri = G.data() + i * m;
            for (int64_t j = i; j < m; ++j) ri[j] -= uki * rk[j];
        }
    }
    // U^T Y = B (forward), then U X = Y (backward); rows of B are right-hand sides' entries
    for (int64_t k = 0; k < m; ++k) {
        double * bk = B.data() + k * d;
        const double ukk = G[k * m + k];
        for (int64_t e = 0; e < d; ++e) bk[e] /= ukk;
        for (int64_t i = k + 1; i < m; ++i) {
            const double uki = G[k * m + i];
            double * bi = B.data() + i * d;
            for (int64_t e = 0; e < d; ++e) bi[e] -= uki * bk[e];
        }
    }
    for (int64_t k = m - 1; k >= 0; --k) {
        double * bk = B.data() + k * d;
        for (int64_t i = k + 1; i < m; ++i) {
            const double uki = G[k * m + i];
            const double * bi = B.data() + i * d;
            for (int64_t e = 0; e < d; ++e) bk[e] -= uki * bi[e];
        }
        const double ukk = G[k * m + k];
        for (int64_t e = 0; e < d; ++e) bk[e] /= ukk;
    }
    return true;
}

// The CPU backend with the context's threads, and a graph allocator reused across layers.
struct CpuGraph {
    ggml_backend_t backend = nullptr;
    ggml_gallocr_t alloc = nullptr;
    std::vector<uint8_t> meta;
    ~CpuGraph() {
        if (alloc != nullptr) ggml_gallocr_free(alloc);
        if (backend != nullptr) ggml_backend_free(backend);
    }
    bool init(int n_threads) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (dev == nullptr || (backend = start_backend(dev, n_threads)) == nullptr) return false;
        alloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
        return alloc != nullptr;
    }
};

void set_input(ggml_tensor * t, const std::vector<float> & host) { ggml_backend_tensor_set(t, host.data(), 0, ggml_nbytes(t)); }

}  // namespace

int32_t refit_values(const ParsedState & full, const ParsedState & composed, const int32_t * sel, int32_t n_layer,
                     int32_t n_head_kv, int32_t n_keep, const kvc_refit & refit) {
    const kvc_capture * cap = refit.queries;
    if (cap == nullptr) return fail(KVC_ERR_INVALID_ARGUMENT, "the refit names no capture of reference queries");
    if (cap->active) return fail(KVC_ERR_INVALID_ARGUMENT, "the capture of reference queries is still active");
    if (!(refit.ridge > 0.0f) || !std::isfinite(refit.ridge)) {
        return fail(KVC_ERR_INVALID_ARGUMENT, "the refit's ridge must be a positive number");
    }
    if (!cap->queries_unusable.empty()) {
        return fail(KVC_ERR_UNSUPPORTED, "value refit of " + cap->queries_unusable + " (its queries were not kept)");
    }
    if (full.tail != nullptr) {
        return fail(KVC_ERR_UNSUPPORTED, "value refit of a model with a sliding-window cache (iSWA) is not supported");
    }
    if (cap->queries.size() != static_cast<size_t>(n_layer) || full.n_layer != static_cast<uint32_t>(n_layer) ||
        composed.n_layer != full.n_layer || composed.n_cells != static_cast<uint32_t>(n_keep)) {
        return fail(KVC_ERR_INVALID_ARGUMENT, "the reference queries, the context and the composed cells have different layers");
    }
    const int32_t n_head = cap->n_head;
    if (n_head_kv <= 0 || n_head % n_head_kv != 0) {
        return fail(KVC_ERR_INVALID_ARGUMENT, "the query heads do not split into " + std::to_string(n_head_kv) + " kv heads");
    }
    const int64_t group = n_head / n_head_kv, n = full.n_cells, C = n_keep;
    for (int32_t il = 0; il < n_layer; ++il) {
        const int64_t D = cap->query_dim[il];
        const TensorRows & k = full.k[il];
        const TensorRows & v = composed.v[il];
        if (D == 0 || cap->queries[il].empty()) {
            return fail(KVC_ERR_INVALID_ARGUMENT, "the capture kept no reference queries for layer " + std::to_string(il));
        }
        if (k.n_embd != D * n_head_kv || full.v[il].n_embd != D * n_head_kv || v.n_embd != D * n_head_kv) {
            return fail(KVC_ERR_UNSUPPORTED, "layer " + std::to_string(il) + "'s keys or values are not " +
                                                 std::to_string(n_head_kv) + " heads of the queries' dimension");
        }
        const auto vt = static_cast<ggml_type>(v.type);
        if (!readable_as_f32(k.type, false) || !readable_as_f32(v.type, full.v_trans != 0) ||
            (D % ggml_blck_size(vt)) != 0 || ggml_quantize_requires_imatrix(vt)) {
            return fail(KVC_ERR_UNSUPPORTED, std::string("value refit of a ") + ggml_type_name(static_cast<ggml_type>(k.type)) +
                                                 " K / " + ggml_type_name(vt) + " V cache");
        }
    }
    for (size_t i = 0; i < static_cast<size_t>(n_layer) * n_head_kv * C; ++i) {
        if (sel[i] < 0 || sel[i] >= n) return fail(KVC_ERR_INVALID_ARGUMENT, "selection index out of range");
    }

    CpuGraph cpu;
    if (!cpu.init(static_cast<int>(cap->n_threads > 0 ? cap->n_threads : max_threads()))) return fail(KVC_ERR_UNSUPPORTED, "no CPU backend for the value refit");
    const bool vtrans = full.v_trans != 0;
    std::vector<float> kf, vf, q, kg, ks, vtg, out_g, out_r;
    for (int32_t il = 0; il < n_layer; ++il) {
        const int64_t D = cap->query_dim[il], n_q = static_cast<int64_t>(cap->queries[il].size()) / (n_head * D);
        const int64_t M = n_q * group;
        read_rows(full.k[il], false, full.n_cells, kf);
        read_rows(full.v[il], vtrans, full.n_cells, vf);
        // per kv head: keys [n, D], kept keys [C, D], values transposed [D, n], queries of the group [M, D]
        kg.resize(n_head_kv * n * D);
        ks.resize(n_head_kv * C * D);
        vtg.resize(n_head_kv * D * n);
        q.resize(n_head_kv * M * D);
        const std::vector<float> & qs = cap->queries[il];  // [n_q, n_head, D]
        for (int64_t g = 0; g < n_head_kv; ++g) {
            for (int64_t j = 0; j < n; ++j) {
                std::memcpy(&kg[(g * n + j) * D], &kf[j * n_head_kv * D + g * D], D * sizeof(float));
                for (int64_t e = 0; e < D; ++e) vtg[(g * D + e) * n + j] = vf[j * n_head_kv * D + g * D + e];
            }
            const int32_t * s = sel + (static_cast<size_t>(il) * n_head_kv + g) * C;
            for (int64_t c = 0; c < C; ++c) std::memcpy(&ks[(g * C + c) * D], &kf[s[c] * n_head_kv * D + g * D], D * sizeof(float));
            for (int64_t h = 0; h < group; ++h) {
                for (int64_t t = 0; t < n_q; ++t) {
                    std::memcpy(&q[(g * M + h * n_q + t) * D], &qs[(t * n_head + g * group + h) * D], D * sizeof(float));
                }
            }
        }
        const bool dual = M < C;  // fewer query rows than cells: solve the M x M system of the dual
        const int64_t m = dual ? M : C;
        const size_t n_tensors = 24;
        cpu.meta.resize(n_tensors * ggml_tensor_overhead() + ggml_graph_overhead());
        ggml_init_params params = {cpu.meta.size(), cpu.meta.data(), /*no_alloc=*/true};
        ggml_context * ctx = ggml_init(params);
        if (ctx == nullptr) return fail(KVC_ERR_OUT_OF_MEMORY, "ggml_init failed for the value refit");
        std::unique_ptr<ggml_context, decltype(&ggml_free)> owner(ctx, ggml_free);
        ggml_tensor * K = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, n, n_head_kv);
        ggml_tensor * KS = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, C, n_head_kv);
        ggml_tensor * VT = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n, D, n_head_kv);
        ggml_tensor * Q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, M, n_head_kv);
        for (ggml_tensor * t : {K, KS, VT, Q}) ggml_set_input(t);
        const float scale = cap->query_scale[il];
        ggml_tensor * P = ggml_soft_max_ext(ctx, ggml_mul_mat(ctx, K, Q), nullptr, scale, 0.0f);   // [n, M]
        ggml_tensor * O = ggml_mul_mat(ctx, VT, P);                                                 // [D, M]
        ggml_tensor * A = ggml_soft_max_ext(ctx, ggml_mul_mat(ctx, KS, Q), nullptr, scale, 0.0f);  // [C, M]
        ggml_tensor * At = ggml_cont(ctx, ggml_transpose(ctx, A));                                  // [M, C]
        ggml_tensor * gram = nullptr, * rhs = nullptr;
        if (dual) {
            gram = ggml_mul_mat(ctx, A, A);  // A A^T [M, M]
            rhs = O;                          // O, minus A V_S on the host: [D, M]
        } else {
            gram = ggml_mul_mat(ctx, At, At);                                      // A^T A [C, C]
            rhs = ggml_mul_mat(ctx, At, ggml_cont(ctx, ggml_transpose(ctx, O)));  // A^T O [C, D]
        }
        for (ggml_tensor * t : {gram, rhs}) ggml_set_output(t);
        if (dual) ggml_set_output(A);  // the dual's V' = V_S + A^T Y reads A on the host
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, gram);
        ggml_build_forward_expand(gf, rhs);
        if (!ggml_gallocr_alloc_graph(cpu.alloc, gf)) return fail(KVC_ERR_OUT_OF_MEMORY, "the value refit's graph");
        set_input(K, kg);
        set_input(KS, ks);
        set_input(VT, vtg);
        set_input(Q, q);
        if (ggml_backend_graph_compute(cpu.backend, gf) != GGML_STATUS_SUCCESS) {
            return fail(KVC_ERR_INTERNAL, "the value refit's graph failed on the CPU backend");
        }
        out_g.resize(ggml_nelements(gram));
        out_r.resize(ggml_nelements(rhs));
        ggml_backend_tensor_get(gram, out_g.data(), 0, ggml_nbytes(gram));
        ggml_backend_tensor_get(rhs, out_r.data(), 0, ggml_nbytes(rhs));
        std::vector<float> a_host;
        if (dual) {
            a_host.resize(ggml_nelements(A));
            ggml_backend_tensor_get(A, a_host.data(), 0, ggml_nbytes(A));
        }
        bool ok = true;
        parallel_for(n_head_kv, [&](int64_t g0, int64_t g1) {
            std::vector<double> G, B, X;
            std::vector<float> row(D);
            for (int64_t g = g0; g < g1; ++g) {
                const float * gg = out_g.data() + g * m * m;
                G.assign(gg, gg + m * m);
                double trace = 0.0;
                for (int64_t i = 0; i < m; ++i) trace += G[i * m + i];
                // the ridge is relative to A^T A's mean diagonal (the same for A A^T's): scale-free
                const double mu = refit.ridge * std::max(trace, 1e-30) / static_cast<double>(C);
                const int32_t * s = sel + (static_cast<size_t>(il) * n_head_kv + g) * C;
                auto kept_value = [&](int64_t c, int64_t e) { return static_cast<double>(vf[s[c] * n_head_kv * D + g * D + e]); };
                if (!dual) {
                    // (A^T A + mu I) V' = A^T O + mu V_S, solved in place: X holds V'
                    X.resize(C * D);
                    const float * r = out_r.data() + g * C * D;  // [D][C]
                    for (int64_t c = 0; c < C; ++c)
                        for (int64_t e = 0; e < D; ++e) X[c * D + e] = r[e * C + c] + mu * kept_value(c, e);
                    if (!solve_spd(G, m, mu, X, D)) { ok = false; return; }
                } else {
                    // V' = V_S + A^T (A A^T + mu I)^-1 (O - A V_S)
                    const float * a = a_host.data() + g * M * C;  // [M][C]
                    const float * o = out_r.data() + g * M * D;   // [M][D]
                    B.assign(M * D, 0.0);
                    for (int64_t i = 0; i < M; ++i) {
                        for (int64_t e = 0; e < D; ++e) B[i * D + e] = o[i * D + e];
                        for (int64_t c = 0; c < C; ++c) {
                            const double w = a[i * C + c];
                            for (int64_t e = 0; e < D; ++e) B[i * D + e] -= w * kept_value(c, e);
                        }
                    }
                    if (!solve_spd(G, m, mu, B, D)) { ok = false; return; }
                    X.resize(C * D);
                    for (int64_t c = 0; c < C; ++c)
                        for (int64_t e = 0; e < D; ++e) X[c * D + e] = kept_value(c, e);
                    for (int64_t i = 0; i < M; ++i)
                        for (int64_t c = 0; c < C; ++c) {
                            const double w = a[i * C + c];
                            for (int64_t e = 0; e < D; ++e) X[c * D + e] += w * B[i * D + e];
                        }
                }
                for (int64_t c = 0; c < C; ++c) {
                    for (int64_t e = 0; e < D; ++e) row[e] = static_cast<float>(X[c * D + e]);
                    write_value(composed.v[il], vtrans, static_cast<uint32_t>(c), g, D, row.data());
                }
            }
        });
        if (!ok) return fail(KVC_ERR_INTERNAL, "the value refit's system of layer " + std::to_string(il) + " is not positive definite");
    }
    return KVC_OK;
}

}  // namespace kvc
