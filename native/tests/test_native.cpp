// Unit tests of the native core that need no model: state buffers built here byte by byte in
// llama.cpp's layout, scoring and selection on small arrays, the capture fed a ggml tensor.
// Run by ctest (and under AddressSanitizer + UBSan by `make test-asan`).
#include "kvcompose.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

int g_failures = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++g_failures;                                                            \
        }                                                                            \
    } while (0)

#define CHECK_STATUS(expr, expected)                                                          \
    do {                                                                                      \
        const int32_t _st = (expr);                                                           \
        if (_st != (expected)) {                                                              \
            std::fprintf(stderr, "%s:%d: %s returned %s (%s), expected %s\n", __FILE__, __LINE__, \
                         #expr, kvc_status_str(_st), kvc_last_error(), kvc_status_str(expected)); \
            ++g_failures;                                                                     \
        }                                                                                     \
    } while (0)

// ---- a sequence state in llama_state_seq_get_data's layout --------------------------------------
struct Builder {
    std::vector<uint8_t> b;
    template <typename T>
    void put(T v) {
        const auto * p = reinterpret_cast<const uint8_t *>(&v);
        b.insert(b.end(), p, p + sizeof(T));
    }
};

// Value of element e of layer l, cell c; `part` 0 for K, 1 for V (f32 so the tests can read them back).
float value(int part, int layer, int cell, int e) { return 1000.0f * part + 100.0f * layer + 10.0f * cell + e * 0.5f; }

// One cache section: n_stream 1, `n_cells` cells at positions pos0.., n_layer layers of n_embd f32 values.
void section(Builder & w, uint32_t n_cells, uint32_t n_layer, uint32_t n_embd, bool v_trans, int32_t pos0 = 0) {
    w.put<uint32_t>(1);
    w.put<uint32_t>(n_cells);
    for (uint32_t c = 0; c < n_cells; ++c) {
        w.put<int32_t>(pos0 + static_cast<int32_t>(c));
        w.put<uint32_t>(1);
        w.put<int32_t>(0);
    }
    w.put<uint32_t>(v_trans ? 1 : 0);
    w.put<uint32_t>(n_layer);
    for (uint32_t l = 0; l < n_layer; ++l) {
        w.put<int32_t>(GGML_TYPE_F32);
        w.put<uint64_t>(n_embd * sizeof(float));
        for (uint32_t c = 0; c < n_cells; ++c)
            for (uint32_t e = 0; e < n_embd; ++e) w.put<float>(value(0, l, c, e));
    }
    for (uint32_t l = 0; l < n_layer; ++l) {
        w.put<int32_t>(GGML_TYPE_F32);
        if (v_trans) {
            w.put<uint32_t>(sizeof(float));
            w.put<uint32_t>(n_embd);
            for (uint32_t e = 0; e < n_embd; ++e)
                for (uint32_t c = 0; c < n_cells; ++c) w.put<float>(value(1, l, c, e));
        } else {
            w.put<uint64_t>(n_embd * sizeof(float));
            for (uint32_t c = 0; c < n_cells; ++c)
                for (uint32_t e = 0; e < n_embd; ++e) w.put<float>(value(1, l, c, e));
        }
    }
}

std::vector<uint8_t> make_state(uint32_t n_cells, uint32_t n_layer, uint32_t n_embd, bool v_trans,
                                bool with_swa = false) {
    Builder w;
    w.put<uint32_t>(0xaf143cd8u);
    w.put<int32_t>(0);
    section(w, n_cells, n_layer, n_embd, v_trans);
    if (with_swa) {
        section(w, 2, 1, n_embd, v_trans, static_cast<int32_t>(n_cells) - 2);
    }
    return w.b;
}

float read_f32(const std::vector<uint8_t> & b, size_t off) {
    float f;
    std::memcpy(&f, b.data() + off, sizeof f);
    return f;
}

// ---- tests -------------------------------------------------------------------------------------
void test_parse_valid_states() {
    for (bool v_trans : {false, true}) {
        for (bool swa : {false, true}) {
            const auto s = make_state(5, 2, 8, v_trans, swa);
            kvc_state_info info{};
            std::vector<int32_t> pos(5);
            CHECK_STATUS(kvc_state_parse(s.data(), s.size(), &info, pos.data(), pos.size()), KVC_OK);
            CHECK(info.n_cells == 5 && info.n_layer == 2 && info.v_trans == (v_trans ? 1u : 0u));
            CHECK(info.k_type == GGML_TYPE_F32 && info.v_type == GGML_TYPE_F32);
            CHECK(info.pos_min == 0 && info.pos_max == 4 && pos[3] == 3);
            CHECK(info.kv_bytes == 5ull * 2 * 2 * 8 * sizeof(float));
            CHECK(info.swa_n_cells == (swa ? 2u : 0u) && info.swa_n_layer == (swa ? 1u : 0u));
        }
    }
}

void test_every_truncation_and_byte_flip_is_an_error_not_a_crash() {
    for (bool swa : {false, true}) {
        const auto s = make_state(3, 2, 4, true, swa);
        const size_t first_cache_end = make_state(3, 2, 4, true, false).size();
        kvc_state_info info{};
        for (size_t n = 0; n < s.size(); ++n) {
            if (swa && n == first_cache_end) continue;  // a whole state of one cache: valid
            const std::vector<uint8_t> cut(s.begin(), s.begin() + n);  // exact size: ASan sees any overrun
            const int32_t st = kvc_state_parse(cut.empty() ? nullptr : cut.data(), cut.size(), &info, nullptr, 0);
            CHECK(st == KVC_ERR_CORRUPT_STATE);
            CHECK(std::strlen(kvc_last_error()) > 0);
        }
        // trailing garbage is refused, not ignored
        auto longer = s;
        longer.push_back(0);
        CHECK_STATUS(kvc_state_parse(longer.data(), longer.size(), &info, nullptr, 0), KVC_ERR_CORRUPT_STATE);
        // every header byte set to 0xff: an error or a valid state, never a crash
        for (size_t i = 0; i < 64 && i < s.size(); ++i) {
            auto bad = s;
            bad[i] = 0xff;
            const int32_t st = kvc_state_parse(bad.data(), bad.size(), &info, nullptr, 0);
            CHECK(st == KVC_OK || st == KVC_ERR_CORRUPT_STATE || st == KVC_ERR_UNSUPPORTED ||
                  st == KVC_ERR_INVALID_ARGUMENT);
        }
    }
    // a K row size near 2^64 / 32 (UBSan found n_embd overflowing on it)
    auto huge = make_state(3, 2, 4, true);
    const uint64_t row = 540431955284459521ull;
    std::memcpy(huge.data() + 8 + 4 + 4 + 3 * 12 + 8 + 4, &row, sizeof row);
    kvc_state_info info{};
    CHECK_STATUS(kvc_state_parse(huge.data(), huge.size(), &info, nullptr, 0), KVC_ERR_CORRUPT_STATE);
    CHECK_STATUS(kvc_state_parse(nullptr, 10, nullptr, nullptr, 0), KVC_ERR_INVALID_ARGUMENT);
}

void test_compose_moves_each_heads_cells() {
    const int32_t n_layer = 2, n_head_kv = 2, n_embd = 8, hd = n_embd / n_head_kv, n_keep = 2;
    for (bool v_trans : {false, true}) {
        for (bool swa : {false, true}) {
            const auto s = make_state(5, n_layer, n_embd, v_trans, swa);
            // layer 0: head 0 keeps cells {0, 4}, head 1 {3, 4}; layer 1: head 0 {1, 2}, head 1 {0, 4}
            const int32_t sel[] = {0, 4, 3, 4, 1, 2, 0, 4};
            size_t size = 0;
            CHECK_STATUS(kvc_state_compose(s.data(), s.size(), sel, n_layer, n_head_kv, n_keep, nullptr, 0, &size),
                         KVC_OK);
            std::vector<uint8_t> out(size);
            CHECK_STATUS(kvc_state_compose(s.data(), s.size(), sel, n_layer, n_head_kv, n_keep, out.data(), out.size(),
                                           &size), KVC_OK);
            kvc_state_info info{};
            std::vector<int32_t> pos(2);
            CHECK_STATUS(kvc_state_parse(out.data(), out.size(), &info, pos.data(), pos.size()), KVC_OK);
            CHECK(info.n_cells == 2);
            CHECK(pos[0] == 3 && pos[1] == 4);  // a cell's position: the newest among the sources it holds
            // header 8 + section (4 + 4 + 2 cells * 12 + 8), then layer 0's K header (12)
            const size_t k0 = 8 + 4 + 4 + 2 * 12 + 8 + 12;
            CHECK(read_f32(out, k0) == value(0, 0, 0, 0));                        // cell 0, head 0 <- cell 0
            CHECK(read_f32(out, k0 + hd * 4) == value(0, 0, 3, hd));              // cell 0, head 1 <- cell 3
            CHECK(read_f32(out, k0 + n_embd * 4 + 4) == value(0, 0, 4, 1));       // cell 1, head 0 <- cell 4
            const size_t k1 = k0 + 2 * n_embd * 4 + 12;
            CHECK(read_f32(out, k1) == value(0, 1, 1, 0));                        // layer 1, cell 0, head 0 <- 1
            CHECK(read_f32(out, k1 + (n_embd + hd) * 4) == value(0, 1, 4, hd));   // layer 1, cell 1, head 1 <- 4
            if (swa) {  // the sliding-window section is copied unchanged
                const auto plain = make_state(5, n_layer, n_embd, v_trans, false);
                const size_t tail = s.size() - plain.size();
                CHECK(info.swa_n_cells == 2);
                CHECK(std::memcmp(out.data() + out.size() - tail, s.data() + plain.size(), tail) == 0);
            }
            // composing every cell is the identity
            const int32_t all[] = {0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4};
            std::vector<uint8_t> same(s.size());
            CHECK_STATUS(kvc_state_compose(s.data(), s.size(), all, n_layer, n_head_kv, 5, same.data(), same.size(),
                                           &size), KVC_OK);
            CHECK(same == s);
        }
    }
}

void test_compose_rejects_bad_selections() {
    const auto s = make_state(4, 1, 4, true);
    size_t size = 0;
    const int32_t descending[] = {2, 1};
    const int32_t out_of_range[] = {0, 4};
    const int32_t negative[] = {-1, 0};
    for (const int32_t * sel : {descending, out_of_range, negative}) {
        CHECK_STATUS(kvc_state_compose(s.data(), s.size(), sel, 1, 1, 2, nullptr, 0, &size), KVC_ERR_INVALID_ARGUMENT);
    }
    const int32_t ok[] = {0, 3};
    CHECK_STATUS(kvc_state_compose(s.data(), s.size(), ok, 2, 1, 2, nullptr, 0, &size), KVC_ERR_INVALID_ARGUMENT);
    const int32_t three_heads[] = {0, 3, 0, 3, 0, 3};  // 4 values per row do not split into 3 heads
    CHECK_STATUS(kvc_state_compose(s.data(), s.size(), three_heads, 1, 3, 2, nullptr, 0, &size), KVC_ERR_UNSUPPORTED);
    CHECK_STATUS(kvc_state_compose(s.data(), s.size(), ok, 1, 1, 5, nullptr, 0, &size), KVC_ERR_INVALID_ARGUMENT);
    std::vector<uint8_t> small(8);
    CHECK_STATUS(kvc_state_compose(s.data(), s.size(), ok, 1, 1, 2, small.data(), small.size(), &size),
                 KVC_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(kvc_state_compose(s.data(), s.size(), nullptr, 1, 1, 2, nullptr, 0, &size), KVC_ERR_INVALID_ARGUMENT);
}

void test_norms() {
    for (bool v_trans : {false, true}) {
        const auto s = make_state(3, 1, 4, v_trans);
        std::vector<float> out(1 * 2 * 3);
        for (int part : {KVC_PART_K, KVC_PART_V}) {
            CHECK_STATUS(kvc_state_norms(s.data(), s.size(), part, 2, out.data(), out.size()), KVC_OK);
            for (int g = 0; g < 2; ++g) {
                for (int c = 0; c < 3; ++c) {
                    double acc = 0;
                    for (int e = 2 * g; e < 2 * g + 2; ++e) acc += std::pow(value(part, 0, c, e), 2.0);
                    CHECK(std::fabs(out[g * 3 + c] - std::sqrt(acc)) < 1e-3);
                }
            }
        }
        CHECK_STATUS(kvc_state_norms(s.data(), s.size(), 7, 2, out.data(), out.size()), KVC_ERR_INVALID_ARGUMENT);
        CHECK_STATUS(kvc_state_norms(s.data(), s.size(), KVC_PART_K, 2, out.data(), 5), KVC_ERR_INVALID_ARGUMENT);
    }
}

void test_select_top() {
    const float scores[] = {0.1f, 0.9f, 0.5f, 0.5f, 0.0f,   // row 0: ties go to the lower index
                            NAN,  0.2f, 0.3f, 0.1f, 0.4f};  // row 1: NaN ranks last
    int32_t out[4];
    CHECK_STATUS(kvc_select_top(scores, 2, 5, 2, nullptr, 0, out), KVC_OK);
    CHECK(out[0] == 1 && out[1] == 2);
    CHECK(out[2] == 2 && out[3] == 4);
    const int32_t forced[] = {0};
    CHECK_STATUS(kvc_select_top(scores, 2, 5, 2, forced, 1, out), KVC_OK);
    CHECK(out[0] == 0 && out[1] == 1 && out[2] == 0 && out[3] == 4);
    const int32_t bad_forced[] = {5};
    CHECK_STATUS(kvc_select_top(scores, 2, 5, 2, bad_forced, 1, out), KVC_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(kvc_select_top(scores, 2, 5, 6, nullptr, 0, out), KVC_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(kvc_select_top(nullptr, 2, 5, 2, nullptr, 0, out), KVC_ERR_INVALID_ARGUMENT);
}

void test_kvcompose_score_and_budgets() {
    // 2 layers, 2 query heads in 1 kv group, 3 tokens
    const float hs[] = {0.2f, 0.6f, 0.2f, 0.4f, 0.4f, 0.2f,   // layer 0, heads 0 and 1
                        0.1f, 0.1f, 0.8f, 0.3f, 0.3f, 0.4f};  // layer 1
    float sc[6];
    CHECK_STATUS(kvc_kvcompose_score(hs, 2, 2, 1, 3, KVC_AGG_MEAN, nullptr, false, sc), KVC_OK);
    CHECK(std::fabs(sc[0] - 0.3f) < 1e-6 && std::fabs(sc[1] - 0.5f) < 1e-6 && std::fabs(sc[5] - 0.6f) < 1e-6);
    CHECK_STATUS(kvc_kvcompose_score(hs, 2, 2, 1, 3, KVC_AGG_MAX, nullptr, false, sc), KVC_OK);
    CHECK(std::fabs(sc[1] - 0.6f) < 1e-6 && std::fabs(sc[5] - 0.8f) < 1e-6);
    CHECK_STATUS(kvc_kvcompose_score(hs, 2, 2, 3, 1, KVC_AGG_MEAN, nullptr, false, sc), KVC_ERR_INVALID_ARGUMENT);
    int32_t budgets[2];
    for (int64_t total = 2; total <= 6; ++total) {
        CHECK_STATUS(kvc_kvcompose_layer_budgets(sc, 2, 1, 3, total, KVC_AGG_MEAN, 0, budgets), KVC_OK);
        CHECK(budgets[0] >= 1 && budgets[1] >= 1 && budgets[0] <= 3 && budgets[1] <= 3);
        // the top `total` (layer, rank) slots, each layer raised to at least one
        CHECK(budgets[0] + budgets[1] >= total && budgets[0] + budgets[1] <= total + 1);
        CHECK(budgets[0] >= budgets[1]);  // layer 0 takes the max over layers
    }
    // a lower bound beyond the token count keeps every token, not more (fuzzer finding)
    CHECK_STATUS(kvc_kvcompose_layer_budgets(sc, 2, 1, 3, 2, KVC_AGG_MEAN, 10, budgets), KVC_OK);
    CHECK(budgets[0] == 3 && budgets[1] == 3);
    float cons[6];
    CHECK_STATUS(kvc_scores_consensus(sc, 2, 1, 3, 1.0f, cons), KVC_OK);
    for (int j = 0; j < 3; ++j) CHECK(cons[j] == cons[3 + j]);  // weight 1: every head ranks alike
    CHECK_STATUS(kvc_scores_consensus(sc, 2, 1, 3, 1.5f, cons), KVC_ERR_INVALID_ARGUMENT);
}

void test_capture_reduces_softmax_tensors() {
    ggml_init_params params = {1 << 20, nullptr, false};
    ggml_context * ctx = ggml_init(params);
    // ne = [n_kv 4, n_tokens 2, n_head 2, 1]
    ggml_tensor * t = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 4, 2, 2, 1);
    ggml_set_name(t, "kq_soft_max-1");
    auto * d = static_cast<float *>(t->data);
    for (int i = 0; i < 16; ++i) d[i] = static_cast<float>(i) / 16.0f;
    ggml_tensor * other = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 4);
    ggml_set_name(other, "kq_soft_max-x");

    kvc_capture * cap = nullptr;
    CHECK_STATUS(kvc_capture_init(&cap), KVC_OK);
    CHECK(kvc_capture_eval_callback(t, true, cap) == false);  // inactive: asks for nothing
    CHECK_STATUS(kvc_capture_begin(cap, 2, 2, 3), KVC_OK);
    CHECK(kvc_capture_eval_callback(t, true, cap) == true);
    CHECK(kvc_capture_eval_callback(other, true, cap) == false);
    CHECK(kvc_capture_eval_callback(t, false, cap) == true);
    CHECK_STATUS(kvc_capture_end(cap), KVC_OK);
    CHECK(kvc_capture_n_queries(cap, 1) == 2 && kvc_capture_n_queries(cap, 0) == 0);
    CHECK(kvc_capture_n_queries(cap, 2) == -1);
    std::vector<float> mx(2 * 2 * 3), mean(2 * 2 * 3);
    CHECK_STATUS(kvc_capture_get_scores(cap, KVC_AGG_MAX, mx.data(), mx.size()), KVC_OK);
    CHECK_STATUS(kvc_capture_get_scores(cap, KVC_AGG_MEAN, mean.data(), mean.size()), KVC_OK);
    // layer 1, head 1, key 2: rows (head 1, queries 0 and 1) hold i = 8 + 2 and 12 + 2
    CHECK(mx[(1 * 2 + 1) * 3 + 2] == 14.0f / 16.0f);
    CHECK(std::fabs(mean[(1 * 2 + 1) * 3 + 2] - 12.0f / 16.0f) < 1e-6);
    CHECK(mx[0] == 0.0f);  // layer 0 saw nothing
    CHECK_STATUS(kvc_capture_get_scores(cap, KVC_AGG_MAX, mx.data(), 3), KVC_ERR_INVALID_ARGUMENT);
    // no head rows were asked for: there are no head scores
    CHECK_STATUS(kvc_capture_get_head_scores(cap, KVC_AGG_MAX, mx.data(), mx.size()), KVC_ERR_INVALID_ARGUMENT);

    // head rows: the first 3 query rows of each layer pooled apart too, counted across ubatches (two
    // ubatches of 2 rows: all of the first, query 0 of the second)
    CHECK_STATUS(kvc_capture_set_head_rows(cap, -1), KVC_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(kvc_capture_set_head_rows(cap, 3), KVC_OK);
    CHECK_STATUS(kvc_capture_begin(cap, 2, 2, 3), KVC_OK);
    CHECK_STATUS(kvc_capture_set_head_rows(cap, 1), KVC_ERR_INVALID_ARGUMENT);  // not while active
    CHECK(kvc_capture_eval_callback(t, false, cap) == true);
    for (int i = 0; i < 16; ++i) d[i] = static_cast<float>(15 - i) / 16.0f;  // the second ubatch
    CHECK(kvc_capture_eval_callback(t, false, cap) == true);
    CHECK_STATUS(kvc_capture_end(cap), KVC_OK);
    std::vector<float> hmx(mx.size()), hmean(mx.size());
    CHECK_STATUS(kvc_capture_get_head_scores(cap, KVC_AGG_MAX, hmx.data(), hmx.size()), KVC_OK);
    CHECK_STATUS(kvc_capture_get_head_scores(cap, KVC_AGG_MEAN, hmean.data(), hmean.size()), KVC_OK);
    CHECK_STATUS(kvc_capture_get_scores(cap, KVC_AGG_MEAN, mean.data(), mean.size()), KVC_OK);
    // layer 1, head 1, key 2: ubatch 1 rows 10/16, 14/16; ubatch 2 rows 15-10 = 5/16 (head), 15-14 = 1/16
    const size_t at = (1 * 2 + 1) * 3 + 2;
    CHECK(hmx[at] == 14.0f / 16.0f);
    CHECK(std::fabs(hmean[at] - (10.0f + 14.0f + 5.0f) / 3.0f / 16.0f) < 1e-6);
    CHECK(std::fabs(mean[at] - (10.0f + 14.0f + 5.0f + 1.0f) / 4.0f / 16.0f) < 1e-6);
    // layer 1, head 0, key 0: rows 0/16, 4/16; then 15/16 (head), 11/16: the max of the head rows is 15/16
    CHECK(hmx[(1 * 2 + 0) * 3 + 0] == 15.0f / 16.0f);
    CHECK_STATUS(kvc_capture_set_head_rows(cap, 0), KVC_OK);
    CHECK_STATUS(kvc_capture_begin(cap, 2, 2, 3), KVC_OK);
    CHECK_STATUS(kvc_capture_end(cap), KVC_OK);
    CHECK_STATUS(kvc_capture_get_head_scores(cap, KVC_AGG_MAX, hmx.data(), hmx.size()), KVC_ERR_INVALID_ARGUMENT);
    for (int i = 0; i < 16; ++i) d[i] = static_cast<float>(i) / 16.0f;

    // pooled rows: only the first 3 query rows of each layer pooled (three ubatches of 2 rows: all of the first,
    // query 0 of the second, none of the third); the rest are a batch's padding, neither scored nor counted
    CHECK_STATUS(kvc_capture_set_pooled_rows(cap, -1), KVC_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(kvc_capture_set_pooled_rows(cap, 3), KVC_OK);
    CHECK_STATUS(kvc_capture_begin(cap, 2, 2, 3), KVC_OK);
    CHECK_STATUS(kvc_capture_set_pooled_rows(cap, 1), KVC_ERR_INVALID_ARGUMENT);  // not while active
    CHECK(kvc_capture_eval_callback(t, false, cap) == true);
    for (int i = 0; i < 16; ++i) d[i] = static_cast<float>(15 - i) / 16.0f;
    CHECK(kvc_capture_eval_callback(t, false, cap) == true);
    for (int i = 0; i < 16; ++i) d[i] = 1.0f;  // padding: were it pooled, every max would be 1
    CHECK(kvc_capture_eval_callback(t, false, cap) == true);
    CHECK_STATUS(kvc_capture_end(cap), KVC_OK);
    CHECK(kvc_capture_n_queries(cap, 1) == 3);
    CHECK_STATUS(kvc_capture_get_scores(cap, KVC_AGG_MAX, mx.data(), mx.size()), KVC_OK);
    CHECK_STATUS(kvc_capture_get_scores(cap, KVC_AGG_MEAN, mean.data(), mean.size()), KVC_OK);
    CHECK(mx[at] == 14.0f / 16.0f);  // the head rows' figures above: the same three rows
    CHECK(std::fabs(mean[at] - (10.0f + 14.0f + 5.0f) / 3.0f / 16.0f) < 1e-6);
    CHECK(mx[(1 * 2 + 0) * 3 + 0] == 15.0f / 16.0f);
    CHECK_STATUS(kvc_capture_set_pooled_rows(cap, 0), KVC_OK);
    for (int i = 0; i < 16; ++i) d[i] = static_cast<float>(i) / 16.0f;

    // a layer beyond the capture and a wrong head count are reported at the end, not crashed on
    CHECK_STATUS(kvc_capture_begin(cap, 1, 2, 3), KVC_OK);
    kvc_capture_eval_callback(t, false, cap);
    CHECK_STATUS(kvc_capture_end(cap), KVC_ERR_CAPTURE);
    CHECK_STATUS(kvc_capture_begin(cap, 2, 3, 3), KVC_OK);
    kvc_capture_eval_callback(t, false, cap);
    CHECK_STATUS(kvc_capture_end(cap), KVC_ERR_CAPTURE);
    CHECK_STATUS(kvc_capture_begin(cap, 0, 2, 3), KVC_ERR_INVALID_ARGUMENT);
    kvc_capture_free(cap);
    ggml_free(ctx);
}

// The graph around one layer's attention, as llama.cpp builds it: views of the layer's cache
// tensors (V read transposed) under "kqv_out-0", and a softmax whose mask hides some cells.
void test_capture_finds_cache_tensors_and_counts_visibility() {
    ggml_init_params params = {1 << 20, nullptr, false};
    ggml_context * ctx = ggml_init(params);
    const int64_t n_embd = 4, kv_size = 8, n_kv = 4;  // 2 kv heads of 2 dims
    ggml_tensor * k = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_embd, kv_size, 1);
    ggml_tensor * v = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_embd, kv_size, 1);
    ggml_set_name(k, "cache_k_l0");
    ggml_set_name(v, "cache_v_l0");
    auto * kd = static_cast<float *>(k->data);
    auto * vd = static_cast<float *>(v->data);
    for (int64_t i = 0; i < n_embd * kv_size; ++i) {
        kd[i] = static_cast<float>(i % 7) - 3.0f;
        vd[i] = static_cast<float>(i % 5) + 1.0f;
    }
    ggml_tensor * k_view = ggml_view_2d(ctx, k, n_embd, n_kv, k->nb[1], 0);
    // llama_kv_cache::get_v, transposed: [n_kv, n_head_kv, head_dim], nb[1] > nb[2]
    ggml_tensor * v_view = ggml_view_3d(ctx, v, n_kv, 2, 2, kv_size * 2 * sizeof(float), kv_size * sizeof(float), 0);
    ggml_tensor * out = ggml_add(ctx, ggml_sum(ctx, k_view), ggml_sum(ctx, v_view));
    ggml_set_name(out, "kqv_out-0");

    // softmax over n_kv = 4 columns for 2 queries and 2 heads; query 0 sees cells 0-1, query 1 cells 0-2
    ggml_tensor * kq = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_kv, 2, 2);
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, 2);
    const float m[8] = {0, 0, -INFINITY, -INFINITY, 0, 0, 0, -INFINITY};
    std::memcpy(mask->data, m, sizeof m);
    ggml_tensor * sm = ggml_soft_max_ext(ctx, kq, mask, 1.0f, 0.0f);
    ggml_set_name(sm, "kq_soft_max-0");
    std::memset(sm->data, 0, ggml_nbytes(sm));

    kvc_capture * cap = nullptr;
    CHECK_STATUS(kvc_capture_init(&cap), KVC_OK);
    CHECK_STATUS(kvc_capture_begin(cap, 1, 2, 3), KVC_OK);
    float norms[2 * 3];
    CHECK_STATUS(kvc_capture_get_norms(cap, KVC_PART_K, 2, 3, norms, 6), KVC_ERR_UNSUPPORTED);  // nothing seen yet
    CHECK(kvc_capture_eval_callback(out, true, cap) == false);  // no flash attention: read, not asked for
    CHECK(kvc_capture_eval_callback(sm, true, cap) == true);
    CHECK(kvc_capture_eval_callback(sm, false, cap) == true);
    CHECK_STATUS(kvc_capture_end(cap), KVC_OK);
    int32_t seen[3];
    CHECK_STATUS(kvc_capture_get_visibility(cap, seen, 3), KVC_OK);
    CHECK(seen[0] == 2 && seen[1] == 2 && seen[2] == 1);  // columns beyond n_keys = 3 are not kept
    CHECK_STATUS(kvc_capture_get_visibility(cap, seen, 2), KVC_ERR_INVALID_ARGUMENT);

    // norms of cells 0..2 read from the cache tensors: K rows, and V transposed (element e of cell c at e * kv_size + c)
    CHECK_STATUS(kvc_capture_get_norms(cap, KVC_PART_K, 2, 3, norms, 6), KVC_OK);
    for (int g = 0; g < 2; ++g) {
        for (int c = 0; c < 3; ++c) {
            const float a = kd[c * n_embd + 2 * g], b = kd[c * n_embd + 2 * g + 1];
            CHECK(std::fabs(norms[g * 3 + c] - std::sqrt(a * a + b * b)) < 1e-6);
        }
    }
    CHECK_STATUS(kvc_capture_get_norms(cap, KVC_PART_V, 2, 3, norms, 6), KVC_OK);
    for (int g = 0; g < 2; ++g) {
        for (int c = 0; c < 3; ++c) {
            const float a = vd[(2 * g) * kv_size + c], b = vd[(2 * g + 1) * kv_size + c];
            CHECK(std::fabs(norms[g * 3 + c] - std::sqrt(a * a + b * b)) < 1e-6);
        }
    }
    CHECK_STATUS(kvc_capture_get_norms(cap, KVC_PART_V, 2, 4, norms, 8), KVC_ERR_INVALID_ARGUMENT);  // > n_keys
    // a new capture forgets the tensors until it sees them again
    CHECK_STATUS(kvc_capture_begin(cap, 1, 2, 3), KVC_OK);
    CHECK_STATUS(kvc_capture_end(cap), KVC_OK);
    CHECK_STATUS(kvc_capture_get_norms(cap, KVC_PART_K, 2, 3, norms, 6), KVC_ERR_UNSUPPORTED);
    kvc_capture_free(cap);
    ggml_free(ctx);
}

// A layer's flash attention as llama.cpp builds it (q permuted to [D, n_tok, n_head], a view of the f16 cache's keys,
// an f16 mask, sinks, softcap), on the CPU backend's buffer: the backend's reduction (the fused softmax-and-pool op)
// scores what the host loops score, with n_kv not a multiple of 8, masked keys and a row that sees nothing. On the
// backend it skips ggml's flash kernel (the keys cut to one while the node is computed) and writes the node's output
// itself: what the kernel computes over all keys.
void test_flash_reduction_on_the_backend_matches_the_host() {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    CHECK(dev != nullptr);
    if (dev == nullptr) return;
    const int64_t D = 32, n_tok = 6, n_head = 4, n_head_kv = 2, n_kv = 45, mask_rows = 64;
    for (const bool sinks_on : {false, true}) {
        for (const float softcap : {0.0f, 20.0f}) {
            ggml_init_params params = {64 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true};
            ggml_context * ctx = ggml_init(params);
            ggml_tensor * q_rows = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, n_head, n_tok);  // as projected
            ggml_tensor * q = ggml_permute(ctx, q_rows, 0, 2, 1, 3);                           // [D, n_tok, n_head]
            ggml_tensor * cache = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, D * n_head_kv, n_kv + 3);
            ggml_tensor * k = ggml_view_3d(ctx, cache, D, n_kv, n_head_kv, cache->nb[1], D * sizeof(ggml_fp16_t), 0);
            ggml_tensor * v = ggml_view_3d(ctx, cache, D, n_kv, n_head_kv, cache->nb[1], D * sizeof(ggml_fp16_t), 0);
            ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, mask_rows);
            ggml_tensor * sinks = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_head);
            ggml_tensor * fa = ggml_flash_attn_ext(ctx, q, k, v, mask, 0.3f, 0.0f, softcap);
            if (sinks_on) ggml_flash_attn_ext_add_sinks(fa, sinks);
            ggml_tensor * out = ggml_reshape_2d(ctx, fa, D * n_head, n_tok);
            ggml_set_name(out, "kqv_out-0");
            ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_dev_buffer_type(dev));
            CHECK(buf != nullptr);
            uint32_t seed = 7;
            auto rnd = [&] {  // uniform in [-2, 2)
                seed = seed * 1664525u + 1013904223u;
                return static_cast<float>(seed >> 8) / static_cast<float>(1 << 24) * 4.0f - 2.0f;
            };
            for (int64_t i = 0; i < ggml_nelements(q_rows); ++i) static_cast<float *>(q_rows->data)[i] = rnd();
            for (int64_t i = 0; i < ggml_nelements(cache); ++i) {
                static_cast<ggml_fp16_t *>(cache->data)[i] = ggml_fp32_to_fp16(rnd());
            }
            for (int64_t i = 0; i < n_head; ++i) static_cast<float *>(sinks->data)[i] = rnd();
            for (int64_t t = 0; t < mask_rows; ++t) {  // causal over the last n_tok keys; keys 3 and 4 hidden; row 5 blind
                for (int64_t j = 0; j < n_kv; ++j) {
                    const bool hidden = j > n_kv - n_tok + t || j == 3 || j == 4 || t == 5;
                    static_cast<ggml_fp16_t *>(mask->data)[t * n_kv + j] = ggml_fp32_to_fp16(hidden ? -INFINITY : 0.0f);
                }
            }
            ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
            CHECK(backend != nullptr);
            ggml_cgraph * gf = ggml_new_graph(ctx);
            ggml_build_forward_expand(gf, out);
            CHECK(ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS);  // ggml's kernel over every key
            const std::vector<float> kernel(static_cast<float *>(fa->data),
                                            static_cast<float *>(fa->data) + ggml_nelements(fa));
            // the attention in double, from the f16 products ggml forms (queries rounded to f16, as for f16 keys)
            std::vector<double> exact(kernel.size(), 0.0);
            const auto * kv = static_cast<const ggml_fp16_t *>(cache->data);
            for (int64_t t = 0; t < n_tok; ++t) {
                for (int64_t h = 0; h < n_head; ++h) {
                    const float * qr = static_cast<const float *>(q_rows->data) + (t * n_head + h) * D;
                    const int64_t g = h / (n_head / n_head_kv);
                    std::vector<double> logit(n_kv);
                    double M = sinks_on ? static_cast<const float *>(sinks->data)[h] : -INFINITY;
                    for (int64_t j = 0; j < n_kv; ++j) {
                        double dot = 0.0;
                        for (int64_t e = 0; e < D; ++e) {
                            dot += ggml_fp16_to_fp32(ggml_fp32_to_fp16(qr[e])) * ggml_fp16_to_fp32(kv[j * D * n_head_kv + g * D + e]);
                        }
                        double x = 0.3 * dot;
                        if (softcap != 0.0f) x = softcap * std::tanh(x / softcap);
                        logit[j] = x + ggml_fp16_to_fp32(static_cast<const ggml_fp16_t *>(mask->data)[t * n_kv + j]);
                        M = std::max(M, logit[j]);
                    }
                    if (M == -INFINITY) continue;  // blind: zeros
                    double Z = sinks_on ? std::exp(static_cast<const float *>(sinks->data)[h] - M) : 0.0;
                    for (int64_t j = 0; j < n_kv; ++j) Z += std::exp(logit[j] - M);
                    for (int64_t j = 0; j < n_kv; ++j) {
                        const double p = std::exp(logit[j] - M) / Z;
                        for (int64_t e = 0; e < D; ++e) {
                            exact[(t * n_head + h) * D + e] += p * ggml_fp16_to_fp32(kv[j * D * n_head_kv + g * D + e]);
                        }
                    }
                }
            }
            std::vector<float> got[3][2];  // [host, backend, backend in blocks][max, mean]
            // the backend twice: one block of queries, then blocks of two (the output written block by block)
            for (const int way : {0, 1, 2}) {
                const int where = way == 0 ? KVC_REDUCE_HOST : KVC_REDUCE_BACKEND;
                if (way == 2) setenv("KVC_REDUCE_BLOCK_BYTES", std::to_string(2 * n_kv * n_head * sizeof(float)).c_str(), 1);
                kvc_capture * cap = nullptr;
                CHECK_STATUS(kvc_capture_init(&cap), KVC_OK);
                CHECK_STATUS(kvc_capture_set_reduce(cap, where), KVC_OK);
                CHECK_STATUS(kvc_capture_begin(cap, 1, n_head, n_kv), KVC_OK);
                std::fill_n(static_cast<float *>(fa->data), ggml_nelements(fa), NAN);
                CHECK(kvc_capture_eval_callback(out, true, cap) == true);
                const bool skipped = where == KVC_REDUCE_BACKEND;
                CHECK(k->ne[1] == (skipped ? 1 : n_kv));  // asked: the kernel sees one key where it is skipped
                CHECK(ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS);
                CHECK(kvc_capture_eval_callback(out, false, cap) == true);
                CHECK(k->ne[1] == n_kv);  // observed: the graph is the model's again
                CHECK(kvc_capture_n_outputs(cap) == (skipped ? 1 : 0));
                double off = 0.0, kernel_off = 0.0;
                for (size_t i = 0; i < kernel.size(); ++i) {
                    off = std::max(off, std::fabs(static_cast<float *>(fa->data)[i] - exact[i]));
                    kernel_off = std::max(kernel_off, std::fabs(kernel[i] - exact[i]));
                }
                // ggml's kernel sums the values in f16 at this size (off by ~4e-3 here); the written output in f32
                CHECK(off < (skipped ? 1e-5 : 1e-2));  // (an untouched NaN fails too)
                CHECK(kernel_off < 1e-2);
                CHECK_STATUS(kvc_capture_end(cap), KVC_OK);
                CHECK(std::string(kvc_capture_get_fallback(cap)).empty());
                // the backend's reduction sends (max, sum) per head and key, + the visible counts: no inputs
                const uint64_t reduced = (2 * n_head + 1) * n_kv * sizeof(float);
                CHECK((kvc_capture_host_bytes(cap) == reduced) == skipped);
                for (const int agg : {KVC_AGG_MAX, KVC_AGG_MEAN}) {
                    auto & dst = got[way][agg == KVC_AGG_MEAN];
                    dst.resize(n_head * n_kv);
                    CHECK_STATUS(kvc_capture_get_scores(cap, agg, dst.data(), dst.size()), KVC_OK);
                }
                kvc_capture_free(cap);
                if (way == 2) unsetenv("KVC_REDUCE_BLOCK_BYTES");
            }
            float worst = 0.0f, top = 0.0f;
            for (int way = 1; way < 3; ++way) {
                for (int a = 0; a < 2; ++a) {
                    for (size_t i = 0; i < got[0][a].size(); ++i) {
                        worst = std::max(worst, std::fabs(got[0][a][i] - got[way][a][i]));
                        top = std::max(top, got[0][a][i]);
                    }
                }
            }
            CHECK(worst < 1e-6f);
            CHECK(top > 0.1f);                                       // something was scored
            CHECK(got[1][0][3] == 0.0f && got[1][0][n_kv + 4] == 0.0f);  // hidden keys: exactly nothing
            ggml_backend_free(backend);
            ggml_backend_buffer_free(buf);
            ggml_free(ctx);
        }
    }
}

void test_status_strings() {
    CHECK(std::string(kvc_status_str(KVC_ERR_CORRUPT_STATE)) == "KVC_ERR_CORRUPT_STATE");
    CHECK(std::string(kvc_status_str(12345)) == "unknown status");
    CHECK(kvc_api_version() == KVC_API_VERSION);
}

}  // namespace

int main() {
    const std::vector<std::pair<const char *, std::function<void()>>> tests = {
        {"parse_valid_states", test_parse_valid_states},
        {"every_truncation_and_byte_flip_is_an_error_not_a_crash",
         test_every_truncation_and_byte_flip_is_an_error_not_a_crash},
        {"compose_moves_each_heads_cells", test_compose_moves_each_heads_cells},
        {"compose_rejects_bad_selections", test_compose_rejects_bad_selections},
        {"norms", test_norms},
        {"select_top", test_select_top},
        {"kvcompose_score_and_budgets", test_kvcompose_score_and_budgets},
        {"capture_reduces_softmax_tensors", test_capture_reduces_softmax_tensors},
        {"capture_finds_cache_tensors_and_counts_visibility", test_capture_finds_cache_tensors_and_counts_visibility},
        {"flash_reduction_on_the_backend_matches_the_host", test_flash_reduction_on_the_backend_matches_the_host},
        {"status_strings", test_status_strings},
    };
    for (const auto & [name, fn] : tests) {
        const int before = g_failures;
        fn();
        std::printf("%s %s\n", g_failures == before ? "ok  " : "FAIL", name);
    }
    std::printf("%d failure(s)\n", g_failures);
    return g_failures == 0 ? 0 : 1;
}
