"""Tiny GGUF models with random (seeded) weights, one per architecture users bring, for the
architecture matrix (tests/test_architectures.py).

Written with the ``gguf`` package (the writer llama.cpp's own converter uses), with tensor names
from its tables and the shapes llama.cpp's loader asks for (vendor/llama.cpp/src/models/<arch>.cpp
of the pinned llama-cpp-python: a wrong shape is refused at load time, so loading checks them).
The tokenizer is the embedded SmolLM2 file's (a real BPE vocabulary of 49152 tokens), so prompts
tokenize as they do on the default model. Random weights say nothing about quality: these models
exercise the machinery (graph node names, cache layouts, head sizes, biases, norms, softcapping).
Each file is a few MB, generated once per cache directory and reused.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

GENERATOR_VERSION = 3  # bump when a model's metadata or tensors change: cached files are regenerated


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """One synthetic model of the matrix.

    Parameters
    ----------
    name : str
        File stem and test id, e.g. ``"llama-gqa-h128"``.
    arch : str
        ``general.architecture``.
    what : str
        What the model exercises (the README's Models table).
    supported : bool
        Whether pykvcompose compresses its cache; unsupported ones must be refused.
    """

    name: str
    arch: str
    what: str
    supported: bool
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 128
    extra: Tuple[Tuple[str, object], ...] = ()

    def option(self, key: str, default=None):
        return dict(self.extra).get(key, default)


MODELS: List[TinyModel] = [
    TinyModel(
        "llama-mha-h64",
        "llama",
        "MHA (kv heads = heads), head size 64",
        True,
        n_embd=64,
        n_head=2,
        n_head_kv=2,
        head_dim=64,
    ),
    TinyModel(
        "llama-gqa-h128",
        "llama",
        "GQA 4:1, head size 128 (attention.key_length)",
        True,
        n_embd=64,
        n_head=4,
        n_head_kv=1,
        head_dim=128,
    ),
    TinyModel("qwen2", "qwen2", "Q/K/V biases, GQA 2:1", True, n_embd=64, n_head=2, n_head_kv=1, head_dim=32),
    TinyModel(
        "qwen3", "qwen3", "Q/K RMS norms per head, head size 128", True, n_embd=64, n_head=2, n_head_kv=1, head_dim=128
    ),
    TinyModel(
        "phi3", "phi3", "fused QKV (attn_qkv), fused gate/up FFN", True, n_embd=64, n_head=2, n_head_kv=2, head_dim=32
    ),
    TinyModel(
        "gemma2",
        "gemma2",
        "attention logit softcapping, sliding window on every other layer, GQA 2:1",
        True,
        n_embd=64,
        n_head=4,
        n_head_kv=2,
        head_dim=64,
        extra=(("sliding_window", 64),),
    ),
    TinyModel(
        "gemma3",
        "gemma3",
        "Q/K norms, 5 sliding-window layers to 1 global, MHA",
        True,
        n_embd=64,
        n_layer=6,
        n_head=2,
        n_head_kv=2,
        head_dim=64,
        extra=(("sliding_window", 64),),
    ),
    TinyModel(
        "olmo2",
        "olmo2",
        "Q/K norms over all heads, post-norms, untied output",
        True,
        n_embd=64,
        n_head=2,
        n_head_kv=2,
        head_dim=32,
    ),
    TinyModel(
        "granite",
        "granite",
        "attention/residual/embedding/logit scales",
        True,
        n_embd=64,
        n_head=2,
        n_head_kv=1,
        head_dim=32,
    ),
    # refused: no per-token (layer, kv head) K/V rows to compose
    TinyModel(
        "deepseek2",
        "deepseek2",
        "multi-head latent attention (MLA)",
        False,
        n_embd=64,
        n_head=2,
        n_head_kv=1,
        head_dim=96,
    ),  # one latent kv head, as converted MLA files have
    TinyModel("mamba", "mamba", "recurrent (state-space), no KV cache", False, n_embd=64, n_head=0, n_head_kv=0),
    TinyModel(
        "jamba", "jamba", "hybrid: attention and Mamba layers", False, n_embd=64, n_head=2, n_head_kv=2, head_dim=32
    ),
    TinyModel("t5", "t5", "encoder-decoder", False, n_embd=64, n_head=2, n_head_kv=2, head_dim=32),
]

BY_NAME: Dict[str, TinyModel] = {m.name: m for m in MODELS}


def cache_dir() -> pathlib.Path:
    """Where generated models are kept: ``$PYKVCOMPOSE_TINY_MODELS`` or ``build/tiny-models`` of the checkout."""
    env = os.environ.get("PYKVCOMPOSE_TINY_MODELS")
    return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[1] / "build" / "tiny-models"


def model_file(spec: TinyModel, directory: Optional[pathlib.Path] = None) -> pathlib.Path:
    """The GGUF file of ``spec``, written on first use (atomically: a parallel run never reads half a file)."""
    from pykvcompose.models import default_model_path

    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.name}-v{GENERATOR_VERSION}.gguf"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_model(spec, tmp, tokenizer_from=default_model_path())
        tmp.replace(path)
    return path


# ---- writing ---------------------------------------------------------------------------------------------


@functools.cache
def _tokenizer_fields(path: str):
    """The ``tokenizer.*`` key-value fields of a GGUF file, as (key, value, type, sub_type)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = []  # tuples, so the cache can hand them to every model
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    return out


class _Tensors:
    """Seeded random tensors named from gguf's tables; ``shape`` in llama.cpp's order (ne0 first)."""

    def __init__(self, writer, arch: str, seed: int):
        import gguf

        self.gguf, self.writer = gguf, writer
        self.rng = np.random.default_rng(seed)
        self.names = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        # by name: gguf's tables give some tensors two enum members (FFN_NORM / FFN_PRE_NORM)
        self.allowed = {gguf.TENSOR_NAMES[k] for k in gguf.MODEL_TENSORS[self.names[arch]]}

    def __call__(self, kind: str, shape, bid: Optional[int] = None, suffix: str = "weight", fill=None) -> None:
        gguf = self.gguf
        template = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)]
        assert template in self.allowed, f"{kind} is not a tensor of this architecture in gguf's tables"
        name = template.format(bid=bid) + (f".{suffix}" if suffix else "")
        np_shape = tuple(reversed(shape))
        if fill is not None:  # norms: 1 (plus a little noise, so a mix-up of norms shows)
            data = (fill + 0.05 * self.rng.standard_normal(np_shape)).astype(np.float32)
        else:
            data = (self.rng.standard_normal(np_shape) * (0.5 / np.sqrt(shape[0]))).astype(np.float32)
        if kind in ("TOKEN_EMBD", "OUTPUT"):  # the bulk of the file (49152 rows): q8_0 halves it
            q8 = gguf.GGMLQuantizationType.Q8_0
            self.writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
            return
        if len(shape) >= 2 and kind not in ("SSM_CONV1D", "SSM_A"):  # ggml's ssm_conv/ssm_scan take f32 only
            data = data.astype(np.float16)
        self.writer.add_tensor(name, data)


def write_model(spec: TinyModel, path: pathlib.Path, tokenizer_from: str, seed: int = 0) -> None:
    """Write ``spec`` as a GGUF file at ``path`` with the tokenizer of the GGUF file ``tokenizer_from``."""
    import gguf

    fields = _tokenizer_fields(tokenizer_from)
    n_vocab = len(next(v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"))
    arch = spec.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("pykvcompose tiny model")  # no architecture in it: llama.cpp matches names like "phi3"
    w.add_context_length(4096)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    if spec.arch != "jamba":  # jamba's are per layer (its builder)
        w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    t = _Tensors(w, arch, seed + sum(map(ord, spec.name)))
    E, L, F = spec.n_embd, spec.n_layer, spec.n_ff
    d, H, Hkv = spec.head_dim, spec.n_head, spec.n_head_kv
    BUILDERS[arch](spec, w, t, E, L, F, d, H, Hkv, n_vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _key_length(w, d):
    w.add_key_length(d)
    w.add_value_length(d)


def _embeddings(t, E, n_vocab, tied=True):
    t("TOKEN_EMBD", (E, n_vocab))
    t("OUTPUT_NORM", (E,), fill=1.0)
    if not tied:
        t("OUTPUT", (E, n_vocab))


def _attention(t, i, E, d, H, Hkv, bias=False, fused=False):
    if fused:
        t("ATTN_QKV", (E, d * (H + 2 * Hkv)), i)
    else:
        for kind, rows in (("ATTN_Q", d * H), ("ATTN_K", d * Hkv), ("ATTN_V", d * Hkv)):
            t(kind, (E, rows), i)
            if bias:
                t(kind, (rows,), i, suffix="bias")
    t("ATTN_OUT", (d * H, E), i)


def _ffn(t, i, E, F):
    t("FFN_GATE", (E, F), i)
    t("FFN_UP", (E, F), i)
    t("FFN_DOWN", (F, E), i)


def _llama(spec, w, t, E, L, F, d, H, Hkv, n_vocab):
    _key_length(w, d)
    if spec.arch == "granite":
        w.add_logit_scale(0.5)
        w.add_residual_scale(0.7)
        w.add_embedding_scale(2.0)
        w.add_attention_scale(1.0 / d)
    _embeddings(t, E, n_vocab)
    for i in range(L):
        t("ATTN_NORM", (E,), i, fill=1.0)
        _attention(t, i, E, d, H, Hkv, bias=spec.arch == "qwen2")
        if spec.arch == "qwen3":
            t("ATTN_Q_NORM", (d,), i, fill=1.0)
            t("ATTN_K_NORM", (d,), i, fill=1.0)
        t("FFN_NORM", (E,), i, fill=1.0)
        _ffn(t, i, E, F)


def _phi3(spec, w, t, E, L, F, d, H, Hkv, n_vocab):
    w.add_rope_dimension_count(d)
    _embeddings(t, E, n_vocab)
    for i in range(L):
        t("ATTN_NORM", (E,), i, fill=1.0)
        _attention(t, i, E, d, H, Hkv, fused=True)
        t("FFN_NORM", (E,), i, fill=1.0)
        t("FFN_UP", (E, 2 * F), i)
        t("FFN_DOWN", (F, E), i)


def _gemma(spec, w, t, E, L, F, d, H, Hkv, n_vocab):
    _key_length(w, d)
    w.add_sliding_window(spec.option("sliding_window"))
    if spec.arch == "gemma2":
        w.add_attn_logit_softcapping(5.0)  # low, so the tanh bends the random logits
        w.add_final_logit_softcapping(30.0)
    _embeddings(t, E, n_vocab)
    for i in range(L):
        t("ATTN_NORM", (E,), i, fill=1.0)
        _attention(t, i, E, d, H, Hkv)
        t("ATTN_POST_NORM", (E,), i, fill=1.0)
        if spec.arch == "gemma3":
            t("ATTN_Q_NORM", (d,), i, fill=1.0)
            t("ATTN_K_NORM", (d,), i, fill=1.0)
        t("FFN_NORM", (E,), i, fill=1.0)
        _ffn(t, i, E, F)
        t("FFN_POST_NORM", (E,), i, fill=1.0)


def _olmo2(spec, w, t, E, L, F, d, H, Hkv, n_vocab):
    _embeddings(t, E, n_vocab, tied=False)
    for i in range(L):
        _attention(t, i, E, d, H, Hkv)
        t("ATTN_Q_NORM", (d * H,), i, fill=1.0)
        t("ATTN_K_NORM", (d * Hkv,), i, fill=1.0)
        t("ATTN_POST_NORM", (E,), i, fill=1.0)
        _ffn(t, i, E, F)
        t("FFN_POST_NORM", (E,), i, fill=1.0)


def _deepseek2(spec, w, t, E, L, F, d, H, Hkv, n_vocab):
    rope, nope, kv_rank, v_dim = 32, 32, 64, 32
    w.add_leading_dense_block_count(L)  # every layer dense: no experts needed
    w.add_q_lora_rank(0)
    w.add_kv_lora_rank(kv_rank)
    w.add_key_length(kv_rank + rope)
    w.add_value_length(kv_rank)
    w.add_key_length_mla(nope + rope)
    w.add_value_length_mla(v_dim)
    w.add_rope_dimension_count(rope)
    w.add_expert_feed_forward_length(F)
    w.add_expert_shared_count(0)
    _embeddings(t, E, n_vocab)
    for i in range(L):
        t("ATTN_NORM", (E,), i, fill=1.0)
        t("ATTN_KV_A_NORM", (kv_rank,), i, fill=1.0)
        t("ATTN_Q", (E, H * (nope + rope)), i)
        t("ATTN_KV_A_MQA", (E, kv_rank + rope), i)
        t("ATTN_K_B", (nope, kv_rank, H), i)
        t("ATTN_V_B", (kv_rank, v_dim, H), i)
        t("ATTN_OUT", (H * v_dim, E), i)
        t("FFN_NORM", (E,), i, fill=1.0)
        _ffn(t, i, E, F)


def _ssm_block(t, i, E, jamba=False):
    d_inner, d_state, dt_rank, d_conv = 2 * E, 16, 8, 4
    t("SSM_IN", (E, 2 * d_inner), i)
    t("SSM_CONV1D", (d_conv, d_inner), i)
    t("SSM_CONV1D", (d_inner,), i, suffix="bias")
    t("SSM_X", (d_inner, dt_rank + 2 * d_state), i)
    t("SSM_DT", (dt_rank, d_inner), i)
    t("SSM_DT", (d_inner,), i, suffix="bias")
    if jamba:
        t("SSM_DT_NORM", (dt_rank,), i, fill=1.0)
        t("SSM_B_NORM", (d_state,), i, fill=1.0)
        t("SSM_C_NORM", (d_state,), i, fill=1.0)
    t("SSM_A", (d_state, d_inner), i, suffix="", fill=-1.0)  # A must be negative (state decay)
    t("SSM_D", (d_inner,), i, suffix="", fill=1.0)
    t("SSM_OUT", (d_inner, E), i)


def _ssm_keys(w, E):
    w.add_ssm_conv_kernel(4)
    w.add_ssm_inner_size(2 * E)
    w.add_ssm_state_size(16)
    w.add_ssm_time_step_rank(8)


def _mamba(spec, w, t, E, L, F, d, H, Hkv, n_vocab):
    _ssm_keys(w, E)
    _embeddings(t, E, n_vocab)
    for i in range(L):
        t("ATTN_NORM", (E,), i, fill=1.0)
        _ssm_block(t, i, E)


def _jamba(spec, w, t, E, L, F, d, H, Hkv, n_vocab):
    _ssm_keys(w, E)
    # layer 0 Mamba (no kv heads), layer 1 attention: per-layer head counts, as llama.cpp reads them
    w.add_head_count_kv([0] + [Hkv] * (L - 1))
    _embeddings(t, E, n_vocab)
    for i in range(L):
        t("ATTN_NORM", (E,), i, fill=1.0)
        if i == 0:
            _ssm_block(t, i, E, jamba=True)
        else:
            _attention(t, i, E, d, H, Hkv)
        t("FFN_NORM", (E,), i, fill=1.0)
        _ffn(t, i, E, F)


def _t5(spec, w, t, E, L, F, d, H, Hkv, n_vocab):
    _key_length(w, d)
    w.add_relative_attn_buckets_count(32)
    w.add_decoder_start_token_id(0)
    t("TOKEN_EMBD", (E, n_vocab))
    t("ENC_OUTPUT_NORM", (E,), fill=1.0)
    t("DEC_OUTPUT_NORM", (E,), fill=1.0)
    for i in range(L):
        for side in ("ENC", "DEC"):
            t(f"{side}_ATTN_NORM", (E,), i, fill=1.0)
            for kind in ("Q", "K", "V"):
                t(f"{side}_ATTN_{kind}", (E, d * H), i)
            t(f"{side}_ATTN_OUT", (d * H, E), i)
            if i == 0:
                t(f"{side}_ATTN_REL_B", (H, 32), i)
            t(f"{side}_FFN_NORM", (E,), i, fill=1.0)
            t(f"{side}_FFN_UP", (E, F), i)
            t(f"{side}_FFN_DOWN", (F, E), i)
        t("DEC_CROSS_ATTN_NORM", (E,), i, fill=1.0)
        for kind in ("Q", "K", "V"):
            t(f"DEC_CROSS_ATTN_{kind}", (E, d * H), i)
        t("DEC_CROSS_ATTN_OUT", (d * H, E), i)


BUILDERS: Dict[str, Callable] = {
    "llama": _llama,
    "qwen2": _llama,
    "qwen3": _llama,
    "granite": _llama,
    "phi3": _phi3,
    "gemma2": _gemma,
    "gemma3": _gemma,
    "olmo2": _olmo2,
    "deepseek2": _deepseek2,
    "mamba": _mamba,
    "jamba": _jamba,
    "t5": _t5,
}
