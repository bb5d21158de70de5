/*
 * kvcompose.h - the C API of pykvcompose's native core.
 *
 * KV-cache compression for llama.cpp with composite tokens (KVCompose, arXiv 2509.05165).
 * Compiled against the llama.h/ggml.h that llama-cpp-python vendors and linked to the
 * libllama/libggml-base that it installs; never a second copy of llama.cpp.
 *
 * Conventions
 *  - Every function that can fail returns an int32_t status (KVC_OK on success, one of the
 *    kvc_status codes otherwise) and leaves a human-readable detail in kvc_last_error(),
 *    which is per thread. No C++ exception crosses this boundary.
 *  - Arrays are C-ordered. Shapes are written [outer, ..., inner].
 *  - Objects come in init/free pairs; free(NULL) is a no-op.
 */
#ifndef KVCOMPOSE_H
#define KVCOMPOSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define KVC_API __declspec(dllexport)
#else
#define KVC_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature or a struct in this header changes. */
#define KVC_API_VERSION 10

struct ggml_tensor;
struct llama_context;

/* ---- status codes ------------------------------------------------------------------------- */
enum kvc_status {
    KVC_OK                   = 0,
    KVC_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a size or an index out of range          */
    KVC_ERR_CORRUPT_STATE    = 2, /* a state buffer that is truncated or inconsistent         */
    KVC_ERR_UNSUPPORTED      = 3, /* a valid input this library cannot handle (type, layout)  */
    KVC_ERR_OUT_OF_MEMORY    = 4, /* an allocation failed                                      */
    KVC_ERR_LLAMA            = 5, /* a llama.cpp call failed; the cache was restored          */
    KVC_ERR_CAPTURE          = 6, /* the attention capture saw tensors it could not use       */
    KVC_ERR_INTERNAL         = 7  /* a bug: please report                                      */
};

/* Name of a status code ("KVC_ERR_CORRUPT_STATE"); "unknown status" for others. */
KVC_API const char * kvc_status_str(int32_t status);
/* Detail of the last failure on the calling thread ("" if none). Valid until the next call. */
KVC_API const char * kvc_last_error(void);

/* ---- build information -------------------------------------------------------------------- */
KVC_API int32_t      kvc_api_version(void);
/* Version of llama-cpp-python whose vendored headers this library was compiled against. */
KVC_API const char * kvc_llama_cpp_python_version(void);
/* sizeof(struct llama_context_params) as compiled: an ABI fingerprint checked at import. */
KVC_API size_t       kvc_sizeof_llama_context_params(void);

/* ---- attention capture -------------------------------------------------------------------- */
/*
 * A capture reduces the attention probabilities "kq_soft_max-{il}" that llama.cpp computes
 * when flash attention is off - and, with flash attention on, the same probabilities recomputed
 * from the inputs of the flash-attention node (queries after RoPE, the cached keys of any type
 * ggml reads, llama.cpp's mask, KQ scale, softcap and sinks; see kvc_capture_set_reduce), read
 * when "kqv_out-{il}" is evaluated - as each ubatch is evaluated, into one score per
 * (layer, query head, key column) - no full matrix is kept. Key column j is cache cell j;
 * only columns [0, n_keys) are recorded. Every query row of every ubatch evaluated while
 * the capture is active counts as a probe query.
 *
 * Install kvc_capture_eval_callback as llama_context_params.cb_eval with the capture as
 * cb_eval_user_data. While inactive it asks the scheduler for nothing, so decoding runs
 * at full speed.
 */
enum kvc_agg {
    KVC_AGG_MAX  = 0,
    KVC_AGG_MEAN = 1
};

typedef struct kvc_capture kvc_capture;

KVC_API int32_t kvc_capture_init(kvc_capture ** out);
KVC_API void    kvc_capture_free(kvc_capture * cap);
/* Reset and activate: scores [n_layer, n_head, n_keys] start empty. Both aggregations are kept, so
 * presses that reduce the same probe differently share one pass. */
KVC_API int32_t kvc_capture_begin(kvc_capture * cap, int32_t n_layer, int32_t n_head, int32_t n_keys);
/* Deactivate. Returns KVC_ERR_CAPTURE if a captured tensor had an unexpected shape or type. */
KVC_API int32_t kvc_capture_end(kvc_capture * cap);
KVC_API bool    kvc_capture_is_active(const kvc_capture * cap);
/* Without flash attention, recompute the probabilities from the inputs of kq_soft_max (q.k, mask,
 * scale) with the flash-attention path's own code instead of reading them: both ways on the same
 * activations, for tests. Off by default. */
KVC_API int32_t kvc_capture_set_recompute(kvc_capture * cap, bool recompute);
/* Where the probabilities are reduced. BACKEND (the default): a small ggml graph on the backend
 * whose buffers hold the layer's tensors (llama.cpp's kq_soft_max pooled in place; with flash
 * attention, mul_mat(k, q) -> softmax -> pooling, in blocks of queries; on the CPU the softmax and
 * the pooling are one op), so 2 x [n_head, n_kv]
 * floats per layer and ubatch reach the host. HOST: every tensor is read on the host and reduced
 * by this library's loops (the reference the backend path is tested against). Where the backend
 * lacks an op or a layout, that layer is reduced on the host and kvc_capture_get_fallback says why. */
enum kvc_reduce {
    KVC_REDUCE_BACKEND = 0,
    KVC_REDUCE_HOST    = 1
};
KVC_API int32_t kvc_capture_set_reduce(kvc_capture * cap, int32_t where);
/* Threads of a CPU backend's reduction (llama_context's n_threads); 0: the machine's cores. */
KVC_API int32_t kvc_capture_set_n_threads(kvc_capture * cap, int32_t n_threads);
/* Why the backend did not reduce some layer since kvc_capture_begin (the first reason, e.g.
 * "the CPU backend lacks POOL_2D"), or "" if it reduced every one. Valid until the next begin. */
KVC_API const char * kvc_capture_get_fallback(const kvc_capture * cap);
/* Bytes of tensor data the capture read on the host since kvc_capture_begin: the reduced scores
 * of a backend reduction, or every input of a host one (copied from a device or read in place). */
KVC_API uint64_t kvc_capture_host_bytes(const kvc_capture * cap);
/* Flash-attention nodes (one per layer and ubatch) whose output the capture computed itself since
 * kvc_capture_begin. On the CPU backend, where the probabilities are recomputed for the scores anyway,
 * ggml's flash kernel is skipped (its keys' view cut to one key while the node runs, then restored) and
 * the backend reduction writes softmax(q.k) v into the node, so that a probe computes its attention once. */
KVC_API int64_t kvc_capture_n_outputs(const kvc_capture * cap);
/* Copy the reduced scores, [n_layer, n_head, n_keys] floats (n_values must equal that product).
 * agg MAX: max over probe queries; agg MEAN: sum over probe queries / their count. */
KVC_API int32_t kvc_capture_get_scores(const kvc_capture * cap, int32_t agg, float * dst, size_t n_values);
/* Head rows: also pool the first `rows` probe query rows of each layer (counted per layer from
 * kvc_capture_begin) apart from the rest, so that a batch can carry rows the caller may discard once it
 * has read the batch's logits (a question and the drafts it checks). 0 (the default) keeps none. Set
 * while inactive; it holds for every later begin until set again. */
KVC_API int32_t kvc_capture_set_head_rows(kvc_capture * cap, int32_t rows);
/* kvc_capture_get_scores over the head rows alone. KVC_ERR_INVALID_ARGUMENT if the last begin kept none. */
KVC_API int32_t kvc_capture_get_head_scores(const kvc_capture * cap, int32_t agg, float * dst, size_t n_values);
/* Pooled rows: pool only the first `rows` probe query rows of each layer (counted per layer from
 * kvc_capture_begin); the later rows of a batch are decoded but neither scored nor counted (padding that
 * brings a batch to the size a faster kernel needs). 0 (the default) pools every row. The head rows are
 * among the pooled ones. Set while inactive; it holds for every later begin until set again. */
KVC_API int32_t kvc_capture_set_pooled_rows(kvc_capture * cap, int32_t rows);
/* Number of probe query rows seen by layer il (-1 if il is out of range). */
KVC_API int64_t kvc_capture_n_queries(const kvc_capture * cap, int32_t il);
/* For every key column j (dst [n_keys]): how many probe query rows of layer 0 the attention mask
 * let see cache cell j. llama.cpp's mask hides other sequences' cells, empty cells and later
 * positions, so this tells which cells held the sequence and (for cells among the probe's own
 * positions) at which position: the layout check before kvc_context_compose_tensors. */
KVC_API int32_t kvc_capture_get_visibility(const kvc_capture * cap, int32_t * dst, size_t n_values);
/* kvc_state_norms of cache cells [0, n_cells), read from the KV cache tensors the last capture's
 * graph used (kvc_context_compose_tensors) instead of a host copy of the sequence state.
 * out [n_layer, n_head_kv, n_cells] over the capture's n_layer layers. KVC_ERR_UNSUPPORTED if the
 * capture did not see every layer's cache tensors or they have a layout this library does not know. */
KVC_API int32_t kvc_capture_get_norms(const kvc_capture * cap, int32_t part, int32_t n_head_kv, int32_t n_cells,
        float * out, size_t n_values);
/* Reference queries (for kvc_refit): while active, keep the query vectors (after RoPE,
 * f32) of every `every`-th probe query row (counted per layer from kvc_capture_begin), up to n_max per
 * layer, with each layer's KQ scale. n_max 0 (the default) keeps none. Set while inactive. Layers with
 * softcapped or ALiBi attention keep none (a refit over them returns KVC_ERR_UNSUPPORTED). */
KVC_API int32_t kvc_capture_set_queries(kvc_capture * cap, int32_t every, int32_t n_max);
/* Layer il's kept queries into dst [n_stored, n_head, head_dim] (n_values must equal that product);
 * dst NULL: only the sizes and scale. Any of n_stored, head_dim, scale may be NULL. */
KVC_API int32_t kvc_capture_get_queries(const kvc_capture * cap, int32_t il, float * dst, size_t n_values,
        int32_t * n_stored, int32_t * head_dim, float * scale);
/* The ggml_backend_sched_eval_callback. user_data is a kvc_capture*. */
KVC_API bool    kvc_capture_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);

/* ---- KVCompose scoring and selection ------------------------------------------------------ */
/*
 * Per-head token scores from probe attention, as the authors implement them:
 *   scores[l, g, j] = agg_group over the query heads h of GQA group g of head_scores[l, h, j]
 *   if value_norms:            scores[l, g, j] *= value_norms[l, g, j]
 *   if add_mean_across_heads:  scores[l, g, j] += mean over g' of scores[l, g', j]
 * head_scores [n_layer, n_head, n_tokens]; value_norms [n_layer, n_head_kv, n_tokens] or NULL;
 * out [n_layer, n_head_kv, n_tokens]. Query head h belongs to group h / (n_head / n_head_kv).
 */
KVC_API int32_t kvc_kvcompose_score(
        const float * head_scores, int32_t n_layer, int32_t n_head, int32_t n_head_kv, int32_t n_tokens,
        int32_t agg_group, const float * value_norms, bool add_mean_across_heads, float * out);

/*
 * The paper's global layer allocation: composite score of rank r in layer l = agg_head over
 * kv heads of each head's r-th largest score (+1e9 for r < keep_token_lower_bound); layer 0
 * takes the max over layers; the n_total_keep largest composite scores (ties: lower layer, then
 * lower rank first) are counted per layer, each layer at least min(n_tokens, max(1, keep_token_lower_bound)).
 * The caller computes n_total_keep = max(1, int(n_layer * n_tokens * (1 - compression_ratio))).
 * scores [n_layer, n_head_kv, n_tokens]; out_budgets [n_layer].
 */
KVC_API int32_t kvc_kvcompose_layer_budgets(
        const float * scores, int32_t n_layer, int32_t n_head_kv, int32_t n_tokens,
        int64_t n_total_keep, int32_t agg_head, int32_t keep_token_lower_bound, int32_t * out_budgets);

/*
 * Pull every head's ranking toward a consensus shared by all layers and heads:
 *   z[l, g, j]   = scores[l, g, j] / mean_j scores[l, g, :]     (unchanged where that mean is <= 0)
 *   out[l, g, j] = (1 - weight) * z[l, g, j] + weight * mean_{l', g'} z[l', g', j]
 * weight 0 keeps each head's own ranking (the paper); 1 makes every head keep the same tokens.
 * scores, out [n_layer, n_head_kv, n_tokens]; weight in [0, 1]. Accumulates in double.
 */
KVC_API int32_t kvc_scores_consensus(const float * scores, int32_t n_layer, int32_t n_head_kv, int32_t n_tokens,
        float weight, float * out);

/*
 * Per (layer, kv head) top-n_keep token indices by score, returned in ascending index order.
 * Higher score first; ties go to the lower index. Tokens listed in forced (each in
 * [0, n_tokens)) are kept by every head. scores [n_rows, n_tokens]; out [n_rows, n_keep].
 */
KVC_API int32_t kvc_select_top(
        const float * scores, int32_t n_rows, int32_t n_tokens, int32_t n_keep,
        const int32_t * forced, int32_t n_forced, int32_t * out);

/* ---- sequence state buffers (llama_state_seq_get_data format) ----------------------------- */
typedef struct kvc_state_info {
    uint32_t n_cells;      /* cells of the sequence                                   */
    uint32_t n_layer;      /* layers with a K cache                                   */
    uint32_t v_trans;      /* 1: V stored transposed (flash attention off)            */
    int32_t  k_type;       /* ggml_type of layer 0's K                                */
    int32_t  v_type;       /* ggml_type of layer 0's V (-1 if no V)                   */
    int32_t  pos_min;      /* smallest cell position                                  */
    int32_t  pos_max;      /* largest cell position                                   */
    int32_t  seq_id;       /* sequence id recorded in the header                      */
    uint64_t kv_bytes;     /* K and V bytes of all cells and layers                   */
    uint32_t swa_n_cells;  /* iSWA models: cells of the sliding-window cache (else 0)  */
    uint32_t swa_n_layer;  /* iSWA models: its layers (else 0)                         */
} kvc_state_info;

/* Validate a single-stream sequence state and describe it. The fields above describe the first
 * cache; iSWA models (Gemma 2/3, ...) write a second, sliding-window cache after it, which every
 * call here validates and keeps unchanged (compose copies it verbatim). positions, if not NULL, receives
 * n_positions (>= n_cells) cell positions in buffer order. */
KVC_API int32_t kvc_state_parse(const uint8_t * src, size_t src_size, kvc_state_info * info,
        int32_t * positions, size_t n_positions);

/*
 * Compose a state of n_keep cells. Cell c of layer l and kv head g holds the K and V of source
 * cell selection[l, g, c]; selection [n_layer, n_head_kv, n_keep] must be strictly ascending
 * per (l, g). Cell c's position is the largest position among the source cells it holds, so
 * positions stay strictly increasing and end at the newest position kept.
 * Head slices of quantized types must be whole blocks. dst NULL or too small: *dst_size gets the
 * size needed and the call returns KVC_ERR_INVALID_ARGUMENT only if dst was not NULL.
 */
KVC_API int32_t kvc_state_compose(const uint8_t * src, size_t src_size,
        const int32_t * selection, int32_t n_layer, int32_t n_head_kv, int32_t n_keep,
        uint8_t * dst, size_t dst_capacity, size_t * dst_size);

/* Which half of the cache a call reads. */
enum kvc_part {
    KVC_PART_K = 0,
    KVC_PART_V = 1
};

/* L2 norm of every (layer, kv head, cell) key or value vector: out [n_layer, n_head_kv, n_cells].
 * Keys of any type with ggml to_float traits; values likewise unless transposed (then f32/f16/bf16). */
KVC_API int32_t kvc_state_norms(const uint8_t * src, size_t src_size, int32_t part, int32_t n_head_kv,
        float * out, size_t n_values);

/* ---- live contexts ----------------------------------------------------------------------- */
typedef struct kvc_compose_result {
    uint32_t cells_before;
    uint32_t cells_after;
    uint64_t kv_bytes_before;
    uint64_t kv_bytes_after;
    int32_t  pos_max;       /* newest position in the rewritten sequence */
} kvc_compose_result;

/*
 * Value refit of the composed cells (not in the paper): for each (layer, kv head), the kept cells' values
 * become the ridge least-squares solution V' of || softmax(s Q K_S^T) V' - softmax(s Q K^T) V ||^2
 * + lambda || V' - V_S ||^2 over the reference queries Q that `queries` kept (kvc_capture_set_queries;
 * all the query heads of the kv head's group): attention over the kept keys then reproduces what
 * attention over all of the context's keys gave those queries (least squares on V as in Attention
 * Matching, arXiv 2602.16284). lambda = ridge x the mean diagonal of A^T A (A = softmax(s Q K_S^T)).
 * The reference queries must attend to every cell of the context (the reconstruct probe's do). Keys of
 * any type ggml reads; values f32/f16/bf16 or quantized types that need no importance matrix (not
 * transposed). Not for iSWA models (KVC_ERR_UNSUPPORTED). Pass NULL for no refit.
 */
typedef struct kvc_refit {
    const kvc_capture * queries;
    float ridge;
} kvc_refit;

/*
 * Rewrite sequence seq_id of ctx in place (through the host state API) with kvc_state_compose
 * (and, with `refit`, the composed values refit).
 * expected_cells > 0 makes the call fail unless the sequence holds exactly that many cells
 * with positions 0..expected_cells-1 in order. On any failure the sequence is restored to its
 * exact prior content and KVC_ERR_LLAMA or the validation error is returned.
 * The kvc_context_* calls keep their host buffers per thread between calls (they only grow, to
 * the largest state seen): page-faulting a fresh state-sized buffer cost more than copying it.
 */
KVC_API int32_t kvc_context_compose(struct llama_context * ctx, int32_t seq_id,
        const int32_t * selection, int32_t n_layer, int32_t n_head_kv, int32_t n_keep,
        int32_t expected_cells, const kvc_refit * refit, kvc_compose_result * result);

/*
 * kvc_context_compose without copying the whole sequence out first: the kept rows are read from the
 * KV cache tensors that cap's last capture found in ctx's graph (host buffers directly; device
 * buffers one layer at a time with ggml_backend_tensor_get), composed into a state of n_keep cells
 * and written with llama_state_seq_set_data. The sequence must be exactly cache cells
 * [0, n_cells), cell j at positions[j] (the caller checks that with kvc_capture_get_visibility);
 * checked here: one sequence per context, one stream, every layer's tensors seen, and the size
 * llama.cpp reports for the sequence equals that of n_cells cells of this layout (so no cell lives
 * elsewhere; iSWA models, whose state carries a second cache, fail this and take kvc_context_compose).
 * Those failures return KVC_ERR_UNSUPPORTED with the cache untouched. If llama.cpp then refuses the
 * composed state, the sequence is left empty (there is no full copy to restore) and the call
 * returns KVC_ERR_LLAMA: the caller must prefill it again.
 */
KVC_API int32_t kvc_context_compose_tensors(struct llama_context * ctx, const kvc_capture * cap, int32_t seq_id,
        const int32_t * positions, int32_t n_cells,
        const int32_t * selection, int32_t n_layer, int32_t n_head_kv, int32_t n_keep,
        const kvc_refit * refit, kvc_compose_result * result);

/* Describe sequence seq_id of ctx (kvc_state_parse on its host state). */
KVC_API int32_t kvc_context_state_info(struct llama_context * ctx, int32_t seq_id, kvc_state_info * info,
        int32_t * positions, size_t n_positions);

/* kvc_state_norms on the host state of sequence seq_id. */
KVC_API int32_t kvc_context_norms(struct llama_context * ctx, int32_t seq_id, int32_t part, int32_t n_head_kv,
        float * out, size_t n_values);

#ifdef __cplusplus
}
#endif

#endif /* KVCOMPOSE_H */
