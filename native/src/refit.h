// Value refit of composed cells (kvc_refit, see refit.cpp).
#pragma once

#include "kvcompose.h"

#include <cstdint>

namespace kvc {
struct ParsedState;

// Rewrites the V rows of `composed` (n_keep cells made from `full` by `sel` [n_layer, n_head_kv, n_keep],
// its rows pointing into a buffer the caller owns) with the least-squares values over refit's reference
// queries. Returns KVC_OK or a failure status (kvc_last_error set); `composed` may then be partly
// rewritten, so the caller does not write it into the cache.
int32_t refit_values(const ParsedState & full, const ParsedState & composed, const int32_t * sel, int32_t n_layer,
                     int32_t n_head_kv, int32_t n_keep, const kvc_refit & refit);
}  // namespace kvc
