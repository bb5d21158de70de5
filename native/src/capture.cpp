// Attention capture: reduces llama.cpp's "kq_soft_max-{il}" tensors, ubatch by ubatch, into one
// score per (layer, query head, key column), so no full attention matrix is ever kept.
#include "kvcompose.h"
#include "status.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

struct kvc_capture {
    bool    active  = false;
    int32_t n_layer = 0;
    int32_t n_head  = 0;
    int32_t n_keys  = 0;

    std::vector<float>   max;        // [n_layer, n_head, n_keys]: running max over probe queries
    std::vector<double>  sum;        // [n_layer, n_head, n_keys]: running sum, for the mean
    std::vector<int64_t> n_queries;  // [n_layer]
    std::vector<float>   staging;    // host copy of tensors that live on a device buffer
    std::string          error;      // first problem seen by the callback (it cannot return one)
};

namespace {

constexpr const char * kSoftMaxPrefix = "kq_soft_max-";

// Layer index of a "kq_soft_max-{il}" tensor, or -1 for any other tensor.
int32_t softmax_layer(const ggml_tensor * t) {
    const char * name = ggml_get_name(t);
    const size_t plen = std::strlen(kSoftMaxPrefix);
    if (std::strncmp(name, kSoftMaxPrefix, plen) != 0) {
        return -1;
    }
    char * end = nullptr;
    const long il = std::strtol(name + plen, &end, 10);
    if (end == name + plen || *end != '\0' || il < 0 || il > std::numeric_limits<int32_t>::max()) {
        return -1;
    }
    return static_cast<int32_t>(il);
}

void reduce(kvc_capture & cap, const ggml_tensor * t, int32_t il) {
    if (il >= cap.n_layer) {
        cap.error = "attention of layer " + std::to_string(il) + " beyond the " + std::to_string(cap.n_layer) + " expected";
        return;
    }
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

    const char * base = nullptr;
    if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
        base = static_cast<const char *>(t->data);
    } else {
        // device tensor: one host copy per layer and ubatch
        const size_t nbytes = ggml_nbytes(t);
        cap.staging.resize((nbytes + sizeof(float) - 1) / sizeof(float));
        ggml_backend_tensor_get(t, cap.staging.data(), 0, nbytes);
        base = reinterpret_cast<const char *>(cap.staging.data());
    }
    if (base == nullptr) {
        cap.error = "attention tensor has no data";
        return;
    }

    const int64_t m = std::min<int64_t>(n_kv, cap.n_keys);
    for (int64_t h = 0; h < n_head; ++h) {
        const size_t at = (static_cast<size_t>(il) * cap.n_head + h) * cap.n_keys;
        float *  mx = cap.max.data() + at;
        double * sm = cap.sum.data() + at;
        for (int64_t q = 0; q < n_tok; ++q) {
            const float * row = reinterpret_cast<const float *>(base + h * t->nb[2] + q * t->nb[1]);
            for (int64_t j = 0; j < m; ++j) {
                mx[j] = std::max(mx[j], row[j]);
                sm[j] += row[j];
            }
        }
    }
    cap.n_queries[il] += n_tok;
}

}  // namespace

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
        cap->n_layer = n_layer;
        cap->n_head  = n_head;
        cap->n_keys  = n_keys;
        cap->error.clear();
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
        if (!cap->error.empty()) {
            return kvc::fail(KVC_ERR_CAPTURE, cap->error);
        }
        return static_cast<int32_t>(KVC_OK);
    });
}

bool kvc_capture_is_active(const kvc_capture * cap) { return cap != nullptr && cap->active; }

int32_t kvc_capture_get_scores(const kvc_capture * cap, int32_t agg, float * dst, size_t n_values) {
    return kvc::guard([&] {
        if (cap == nullptr || dst == nullptr) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "capture or dst is NULL");
        }
        if (agg != KVC_AGG_MAX && agg != KVC_AGG_MEAN) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "agg must be KVC_AGG_MAX or KVC_AGG_MEAN");
        }
        if (n_values != cap->max.size()) {
            return kvc::fail(KVC_ERR_INVALID_ARGUMENT, "dst holds " + std::to_string(n_values) + " values, the capture " +
                                                           std::to_string(cap->max.size()));
        }
        if (agg == KVC_AGG_MAX) {
            std::copy(cap->max.begin(), cap->max.end(), dst);
            return static_cast<int32_t>(KVC_OK);
        }
        const size_t per_layer = static_cast<size_t>(cap->n_head) * cap->n_keys;
        for (int32_t il = 0; il < cap->n_layer; ++il) {
            const double n_q = static_cast<double>(std::max<int64_t>(1, cap->n_queries[il]));
            for (size_t i = il * per_layer; i < (il + 1) * per_layer; ++i) {
                dst[i] = static_cast<float>(cap->sum[i] / n_q);
            }
        }
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
    if (ask) {
        return il >= 0;
    }
    if (il >= 0 && cap->error.empty()) {
        try {
            reduce(*cap, t, il);
        } catch (...) {
            cap->error = "allocation failed while capturing attention";
        }
    }
    return true;
}

}  // extern "C"
