// The capture's reduction run as a small ggml graph on the backend that holds the attention's tensors,
// so only [n_head, n_kv] floats per layer and ubatch reach the host (capture.cpp's loops are the
// oracle and the fallback).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

struct ggml_backend;
struct ggml_backend_device;
struct ggml_tensor;
struct kvc_capture;

namespace kvc {

// What one layer's attention is reduced from: either the probabilities llama.cpp computed
// (`probs`, "kq_soft_max-{il}", flash attention off) or the inputs of its flash-attention node.
struct AttentionInputs {
    const ggml_tensor * probs = nullptr;  // [n_kv, n_tokens, n_head] f32
    const ggml_tensor * q     = nullptr;  // [D, n_tokens, n_head] f32, after RoPE
    const ggml_tensor * k     = nullptr;  // [D, n_kv, n_head_kv] of the cache's type
    const ggml_tensor * mask  = nullptr;  // [n_kv, >= n_tokens] f16/f32, or nullptr
    const ggml_tensor * sinks = nullptr;  // [n_head] f32, or nullptr
    float scale = 1.0f, max_bias = 0.0f, softcap = 0.0f;
    // Flash attention whose kernel was skipped (BackendReducer::writes_output): the layer's values
    // [DV, n_kv, n_head_kv] and the flash node itself, whose output [DV, n_head, n_tokens] f32 the
    // reduction writes, softmax(q.k) v for every row, pooled or not.
    const ggml_tensor * v = nullptr;
    ggml_tensor * out = nullptr;
};

// A backend of device dev running n_threads where the device takes a thread count (its registry's
// "ggml_backend_set_n_threads"), or nullptr if the device cannot start one.
ggml_backend * start_backend(ggml_backend_device * dev, int n_threads);

// The ggml backends, allocators and graph memory the capture reuses across layers and ubatches.
class BackendReducer {
public:
    BackendReducer();
    ~BackendReducer();
    BackendReducer(const BackendReducer &) = delete;
    BackendReducer & operator=(const BackendReducer &) = delete;

    // Folds layer il's attention into cap's running max/sum (and layer 0's mask into cap.visible).
    // Returns false, with `why` naming what the backend lacks (an op, a layout), when it did not:
    // the caller then reduces on the host. Nothing is folded in that case.
    bool reduce(kvc_capture & cap, const AttentionInputs & in, int32_t il, std::string & why);

    // Whether reduce() can also compute this flash-attention layer's output (in.v and in.out set): the CPU,
    // where it computes the probabilities anyway, so that ggml's flash kernel need not compute them again.
    // Asked before the node runs; when true, a reduce() that fails leaves the output unwritten.
    bool writes_output(const kvc_capture & cap, const AttentionInputs & in);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace kvc
