// KVCompose scoring, the paper's layer allocation, and per-head top-C selection.
// The arithmetic order is fixed (float storage, double accumulation) so that an independent
// numpy re-implementation reproduces it exactly.
#include "kvcompose.h"
#include "parallel.h"
#include "status.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <functional>
#include <string>
#include <vector>

namespace {

constexpr float kLowerBoundBonus = 1e9f;  // kvpress's way of pinning the first ranks
constexpr int64_t kParallelWork = 1 << 16;  // scores below which threads cost more than they save

// NaN would break the strict weak ordering of the comparators below: rank it last.
inline float rankable(float x) { return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x; }

bool valid_agg(int32_t agg) { return agg == KVC_AGG_MAX || agg == KVC_AGG_MEAN; }

// rankable(x) as an unsigned key in the same order (-0 and +0 equal, as floats compare), so that
// ranking runs on plain integers: a radix sort, and index ties packed into the low bits.
inline uint32_t order_key(float x) {
    x = rankable(x);
    if (x == 0.0f) x = 0.0f;
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float key_value(uint32_t k) {
    const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}

// Ascending LSD radix sort of 32-bit keys, a byte per pass (tmp: scratch of the same size).
void radix_sort(std::vector<uint32_t> & keys, std::vector<uint32_t> & tmp) {
    tmp.resize(keys.size());
    for (int shift = 0; shift < 32; shift += 8) {
        size_t count[257] = {0};
        for (uint32_t k : keys) ++count[((k >> shift) & 0xffu) + 1];
        for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
        for (uint32_t k : keys) tmp[count[(k >> shift) & 0xffu]++] = k;
        keys.swap(tmp);
    }
}

}  // namespace

extern "C" {

int32_t kvc_kvcompose_score(const float * head_scores, int32_t n_layer, int32_t n_head, int32_t n_head_kv,
                            int32_t n_tokens, int32_t agg_group, const float * value_norms,
                            bool add_mean_across_heads, float * out) {
    return kvc::guard([&] {
        if (head_scores == nullptr || out == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "head_scores or out is NULL");
        }
        if (n_layer <= 0 || n_head <= 0 || n_head_kv <= 0 || n_tokens <= 0 || n_head % n_head_kv != 0) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "need positive sizes and n_head a multiple of n_head_kv");
        }
        if (!valid_agg(agg_group)) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "agg_group must be KVC_AGG_MAX or KVC_AGG_MEAN");
        }
        const int32_t group = n_head / n_head_kv;
        const size_t n = static_cast<size_t>(n_tokens);
        std::vector<double> mean(n);
        for (int32_t l = 0; l < n_layer; ++l) {
            float * layer_out = out + static_cast<size_t>(l) * n_head_kv * n;
            for (int32_t g = 0; g < n_head_kv; ++g) {
                float * row = layer_out + g * n;
                const float * first = head_scores + (static_cast<size_t>(l) * n_head + g * group) * n;
                for (size_t j = 0; j < n; ++j) {
                    double acc = agg_group == KVC_AGG_MAX ? -std::numeric_limits<double>::infinity() : 0.0;
                    for (int32_t k = 0; k < group; ++k) {
                        const double v = first[k * n + j];
                        acc = agg_group == KVC_AGG_MAX ? std::max(acc, v) : acc + v;
                    }
                    row[j] = static_cast<float>(agg_group == KVC_AGG_MAX ? acc : acc / group);
                }
                if (value_norms != nullptr) {
                    const float * norms = value_norms + (static_cast<size_t>(l) * n_head_kv + g) * n;
                    for (size_t j = 0; j < n; ++j) {
                        row[j] = row[j] * norms[j];
                    }
                }
            }
            if (add_mean_across_heads) {
                // the stabiliser: every head also sees how much the whole layer needs a token
                std::fill(mean.begin(), mean.end(), 0.0);
                for (int32_t g = 0; g < n_head_kv; ++g) {
                    for (size_t j = 0; j < n; ++j) {
                        mean[j] += layer_out[g * n + j];
                    }
                }
                for (int32_t g = 0; g < n_head_kv; ++g) {
                    for (size_t j = 0; j < n; ++j) {
                        layer_out[g * n + j] =
                            static_cast<float>(static_cast<double>(layer_out[g * n + j]) + mean[j] / n_head_kv);
                    }
                }
            }
        }
        return static_cast<int32_t>(KVC_OK);
    });
}

int32_t kvc_kvcompose_layer_budgets(const float * scores, int32_t n_layer, int32_t n_head_kv, int32_t n_tokens,
                                    int64_t n_total_keep, int32_t agg_head, int32_t keep_token_lower_bound,
                                    int32_t * out_budgets) {
    return kvc::guard([&] {
        if (scores == nullptr || out_budgets == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "scores or out_budgets is NULL");
        }
        if (n_layer <= 0 || n_head_kv <= 0 || n_tokens <= 0 || keep_token_lower_bound < 0) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "need positive sizes and keep_token_lower_bound >= 0");
        }
        const int64_t total = static_cast<int64_t>(n_layer) * n_tokens;
        if (n_total_keep < 1 || n_total_keep > total) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "n_total_keep must be in [1, n_layer * n_tokens]");
        }
        if (!valid_agg(agg_head)) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "agg_head must be KVC_AGG_MAX or KVC_AGG_MEAN");
        }
        const size_t n = static_cast<size_t>(n_tokens);
        std::vector<float> composite(static_cast<size_t>(total));  // [n_layer, n_tokens]
        kvc::parallel_for(n_layer, [&](int64_t l0, int64_t l1) {
            std::vector<uint32_t> keys(n), tmp(n);
            std::vector<double> acc(n);
            for (int64_t l = l0; l < l1; ++l) {
                std::fill(acc.begin(), acc.end(),
                          agg_head == KVC_AGG_MAX ? -std::numeric_limits<double>::infinity() : 0.0);
                for (int32_t g = 0; g < n_head_kv; ++g) {
                    const float * row = scores + (static_cast<size_t>(l) * n_head_kv + g) * n;
                    std::transform(row, row + n, keys.begin(), order_key);
                    radix_sort(keys, tmp);  // ascending: rank r is keys[n - 1 - r]
                    for (size_t r = 0; r < n; ++r) {
                        const double v = key_value(keys[n - 1 - r]);
                        acc[r] = agg_head == KVC_AGG_MAX ? std::max(acc[r], v) : acc[r] + v;
                    }
                }
                float * comp = composite.data() + l * n;
                for (size_t r = 0; r < n; ++r) {
                    comp[r] = static_cast<float>(agg_head == KVC_AGG_MAX ? acc[r] : acc[r] / n_head_kv);
                    if (static_cast<int64_t>(r) < keep_token_lower_bound) {
                        comp[r] += kLowerBoundBonus;
                    }
                    comp[r] = rankable(comp[r]);  // +inf and -inf scores of one rank sum to NaN
                }
            }
        }, static_cast<int64_t>(n_layer) * n_head_kv * n_tokens >= kParallelWork);
        // layer 0 gets the largest budget: its composite scores are the max over all layers
        for (int32_t l = 1; l < n_layer; ++l) {
            for (size_t r = 0; r < n; ++r) {
                composite[r] = std::max(composite[r], composite[l * n + r]);
            }
        }
        // the n_total_keep largest composite scores, ties to the lower (layer, rank): every score above
        // the n_total_keep-th largest, then that score's ties in index order
        std::vector<float> values(composite);
        std::nth_element(values.begin(), values.begin() + (n_total_keep - 1), values.end(), std::greater<float>());
        const float threshold = values[n_total_keep - 1];
        // a layer cannot keep more tokens than there are (found by fuzz/fuzz_native.py)
        const int32_t floor = std::min<int32_t>(n_tokens, std::max<int32_t>(1, keep_token_lower_bound));
        std::vector<int64_t> counts(n_layer, 0);
        int64_t taken = 0;
        for (int64_t i = 0; i < total; ++i) {
            if (composite[i] > threshold) {
                counts[i / n_tokens] += 1;
                ++taken;
            }
        }
        for (int64_t i = 0; i < total && taken < n_total_keep; ++i) {
            if (composite[i] == threshold) {
                counts[i / n_tokens] += 1;
                ++taken;
            }
        }
        for (int32_t l = 0; l < n_layer; ++l) {
            out_budgets[l] = static_cast<int32_t>(std::max<int64_t>(floor, counts[l]));
        }
        return static_cast<int32_t>(KVC_OK);
    });
}

int32_t kvc_scores_consensus(const float * scores, int32_t n_layer, int32_t n_head_kv, int32_t n_tokens, float weight,
                             float * out) {
    return kvc::guard([&] {
        if (scores == nullptr || out == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "scores or out is NULL");
        }
        if (n_layer <= 0 || n_head_kv <= 0 || n_tokens <= 0 || !(weight >= 0.0f && weight <= 1.0f)) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "need positive sizes and weight in [0, 1]");
        }
        const size_t n = static_cast<size_t>(n_tokens);
        const size_t rows = static_cast<size_t>(n_layer) * n_head_kv;
        std::vector<double> z(rows * n), shared(n, 0.0);
        for (size_t r = 0; r < rows; ++r) {
            const float * row = scores + r * n;
            double sum = 0.0;
            for (size_t j = 0; j < n; ++j) sum += row[j];
            const double mean = sum / n;
            const double scale = mean > 0.0 ? 1.0 / mean : 1.0;
            for (size_t j = 0; j < n; ++j) {
                z[r * n + j] = row[j] * scale;
                shared[j] += z[r * n + j];
            }
        }
        const double w = weight;
        for (size_t r = 0; r < rows; ++r) {
            for (size_t j = 0; j < n; ++j) {
                out[r * n + j] = static_cast<float>((1.0 - w) * z[r * n + j] + w * (shared[j] / rows));
            }
        }
        return static_cast<int32_t>(KVC_OK);
    });
}

int32_t kvc_select_top(const float * scores, int32_t n_rows, int32_t n_tokens, int32_t n_keep, const int32_t * forced,
                       int32_t n_forced, int32_t * out) {
    return kvc::guard([&] {
        if (scores == nullptr || out == nullptr || (forced == nullptr && n_forced > 0)) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "scores, out or forced is NULL");
        }
        if (n_rows <= 0 || n_tokens <= 0 || n_keep <= 0 || n_keep > n_tokens || n_forced < 0) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "need 0 < n_keep <= n_tokens and positive sizes");
        }
        std::vector<char> is_forced(n_tokens, 0);
        int32_t n_unique_forced = 0;
        for (int32_t i = 0; i < n_forced; ++i) {
            if (forced[i] < 0 || forced[i] >= n_tokens) {
                return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "forced token " + std::to_string(forced[i]) + " out of range");
            }
            n_unique_forced += is_forced[forced[i]] ? 0 : 1;
            is_forced[forced[i]] = 1;
        }
        if (n_unique_forced > n_keep) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "more forced tokens than n_keep");
        }
        kvc::parallel_for(n_rows, [&](int64_t r0, int64_t r1) {
            // (score key, ~index): the larger key is the higher score, then the lower index
            std::vector<uint64_t> keys;
            keys.reserve(n_tokens);
            std::vector<char> keep(n_tokens);
            for (int64_t r = r0; r < r1; ++r) {
                const float * row = scores + static_cast<size_t>(r) * n_tokens;
                int32_t * dst = out + static_cast<size_t>(r) * n_keep;
                keys.clear();
                for (int32_t j = 0; j < n_tokens; ++j) {
                    keep[j] = is_forced[j];
                    if (!is_forced[j]) {
                        keys.push_back((static_cast<uint64_t>(order_key(row[j])) << 32) | static_cast<uint32_t>(~j));
                    }
                }
                const int32_t n_free = n_keep - n_unique_forced;
                if (n_free > 0) {
                    std::nth_element(keys.begin(), keys.begin() + (n_free - 1), keys.end(), std::greater<uint64_t>());
                    for (int32_t i = 0; i < n_free; ++i) keep[~static_cast<uint32_t>(keys[i])] = 1;
                }
                int32_t n_dst = 0;
                for (int32_t j = 0; j < n_tokens; ++j) {
                    if (keep[j]) dst[n_dst++] = j;
                }
            }
        }, static_cast<int64_t>(n_rows) * n_tokens >= kParallelWork);
        return static_cast<int32_t>(KVC_OK);
    });
}

}  // extern "C"
