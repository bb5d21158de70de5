"""Press fields: validation and the kvpress conventions."""

import re

import numpy as np
import pytest

from oracles import np_pyramid_budgets
from pykvcompose import KVComposePress
from pykvcompose.presses import PRESSES as PRESSES_BY_NAME
from pykvcompose.presses import (
    BasePress,
    KnormPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from pykvcompose.probe import Probe

PRESSES = list(PRESSES_BY_NAME.values())


@pytest.mark.parametrize("press_cls", PRESSES)
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", True, None, float("nan")])
def test_bad_ratio_is_rejected(press_cls, ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        press_cls(compression_ratio=ratio)


@pytest.mark.parametrize("press_cls", PRESSES)
@pytest.mark.parametrize("ratio,n,kept", [(0.0, 100, 100), (0.5, 101, 50), (0.75, 100, 25), (0.999, 10, 1)])
def test_n_kept_follows_kvpress(press_cls, ratio, n, kept):
    assert press_cls(compression_ratio=ratio).n_kept(n) == kept


@pytest.mark.parametrize(
    "field,value",
    [
        ("scoring", "magic"),
        ("agg_task", "median"),
        ("agg_group", "sum"),
        ("agg_head", None),
        ("window", 0),
        ("window", 2.5),
        ("min_tokens", 1),
        ("keep_token_lower_bound", -1),
        ("add_v_norm", "yes"),
        ("add_mean_across_heads", 1),
        ("lookahead", 0),
        ("lookahead", 1.5),
        ("self_information", 1),
    ],
)
def test_bad_kvcompose_fields_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        KVComposePress(compression_ratio=0.5, **{field: value})


def test_kvpress_fields_and_defaults():
    p = KVComposePress()
    assert isinstance(p, BasePress)
    assert (p.compression_ratio, p.agg_task, p.agg_group, p.agg_head) == (0.0, "max", "mean", "mean")
    assert (p.add_v_norm, p.add_mean_across_heads, p.keep_token_lower_bound) == (False, True, 0)
    assert p.scoring == "auto" and p.probe() == ("lookahead", 32)
    assert KVComposePress(scoring="reconstruct").probe() == ("reconstruct", 0)  # as published, one field away


def test_kvcompose_holds_the_method_in_at_most_12_fields():
    """kvpress's fields (``structured`` aside: llama.cpp's cells are always structured), ours that choose
    the probe and the sentence prior of question-agnostic compression; streaming options live in the
    StreamPolicy, options measured as no gain were removed."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(KVComposePress)]
    assert len(names) <= 13
    assert set(names) == {
        "compression_ratio",
        "agg_task",
        "agg_group",
        "agg_head",
        "add_v_norm",
        "add_mean_across_heads",
        "keep_token_lower_bound",
        "scoring",
        "window",
        "lookahead",
        "min_tokens",
        "self_information",
        "per_head",
    }


@pytest.mark.parametrize("press_cls", PRESSES)
def test_every_press_is_a_dataclass_with_keyword_per_head(press_cls):
    assert press_cls(compression_ratio=0.5).per_head is True
    assert press_cls(0.5, per_head=False).per_head is False
    with pytest.raises(ValueError, match="per_head"):
        press_cls(compression_ratio=0.5, per_head="no")
    assert press_cls.__doc__ and "Parameters" in press_cls.__doc__


@pytest.mark.parametrize(
    "press_cls,field,value",
    [
        (SnapKVPress, "window_size", 0),
        (SnapKVPress, "kernel_size", 0),
        (SnapKVPress, "kernel_size", 1.5),
        (PyramidKVPress, "beta", 0),
        (PyramidKVPress, "window_size", -3),
        (StreamingLLMPress, "n_sink", -1),
        (StreamingLLMPress, "n_sink", "4"),
        (RandomPress, "seed", -1),
        (RandomPress, "seed", "x"),
    ],
)
def test_bad_baseline_fields_are_rejected(press_cls, field, value):
    with pytest.raises(ValueError, match=field):
        press_cls(compression_ratio=0.5, **{field: value})


def fake_probe(L=3, H=6, Hkv=2, n=40, seed=0):
    """A probe with random (row-normalised) attention and norms: scoring needs no model."""
    rng = np.random.default_rng(seed)
    att = {}
    for spec in [("window", 8), ("window", 1), ("lookahead", 32), ("reconstruct", 0)]:
        a = rng.random((L, H, n)).astype(np.float32)
        a /= a.sum(-1, keepdims=True)
        att[spec] = {"max": a, "mean": (a * 0.5).astype(np.float32)}
    norms = {"k": rng.random((L, Hkv, n)).astype(np.float32) + 1, "v": rng.random((L, Hkv, n)).astype(np.float32)}
    return Probe(L, H, Hkv, n, attention=att, norms=norms.__getitem__)


def test_snapkv_scores_equal_a_loop_implementation():
    """kvpress's SnapKV: mean window attention, avg_pool1d(kernel, padding k//2, zeros counted), group mean,
    the window appended above every score."""
    probe = fake_probe()
    press = SnapKVPress(compression_ratio=0.5, window_size=8, kernel_size=5)
    got = press.score(probe)
    att = probe.attention[("window", 8)]["mean"].astype(np.float64)
    L, H, n = att.shape
    m = n - 8
    expected = np.empty((L, 2, n))
    for layer in range(L):
        pooled = np.zeros((H, m))
        for h in range(H):
            for j in range(m):
                window = [att[layer, h, i] if 0 <= i < m else 0.0 for i in range(j - 2, j + 3)]
                pooled[h, j] = sum(window) / 5
        for g in range(2):
            expected[layer, g, :m] = pooled[g * 3 : (g + 1) * 3].mean(axis=0)
        expected[layer, :, m:] = expected[layer, :, :m].max() + 1
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got.shape == (L, 2, n) and got.dtype == np.float32


@pytest.mark.parametrize("kernel", [1, 2, 4, 7])
def test_snapkv_pooling_keeps_length_for_any_kernel(kernel):
    probe = fake_probe()
    assert SnapKVPress(0.5, window_size=8, kernel_size=kernel).score(probe).shape == (3, 2, 40)


def test_tova_scores_are_the_last_query_averaged_over_all_heads():
    probe = fake_probe()
    got = TOVAPress(0.5).score(probe)
    att = probe.attention[("window", 1)]["mean"]
    expected = att[..., :-1].mean(axis=1)
    for g in range(2):
        np.testing.assert_allclose(got[:, g, :-1], expected, rtol=1e-6)
    assert (got[:, :, -1] > got[:, :, :-1].max(axis=-1)).all()


def test_knorm_streaming_random_scores():
    probe = fake_probe()
    np.testing.assert_array_equal(KnormPress(0.5).score(probe), -probe.key_norms())
    s = StreamingLLMPress(compression_ratio=0.75, n_sink=4).score(probe)
    kept = np.flatnonzero(s[0, 0])
    assert kept.tolist() == [0, 1, 2, 3] + list(range(40 - 6, 40))  # 10 kept: 4 sinks + 6 recent
    assert (s == s[0, 0]).all()
    a, b, c = (RandomPress(0.5, seed=s).score(probe) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (3, 2, 40) and 0 <= a.min() and a.max() < 1


def test_pyramid_budgets_follow_kvpress_formula():
    """q_len 1000, ratio 0.5, window 64, beta 20, 4 layers: capacity 564, min 25, max 975 -> 975-l*316.67,
    but max_num >= q_len - window (936) so max 936, min 64: 936, 645, 355, 64."""
    scores = np.zeros((4, 1, 1000), dtype=np.float32)
    budgets = PyramidKVPress(compression_ratio=0.5).layer_budgets(scores)
    assert budgets.tolist() == [936, 645, 355, 64]
    # too short a context for a pyramid: kvpress falls back to SnapKV's uniform budget
    assert PyramidKVPress(compression_ratio=0.5).layer_budgets(np.zeros((4, 1, 100), np.float32)).tolist() == [50] * 4


@pytest.mark.parametrize("n_layer", [1, 4, 30])
@pytest.mark.parametrize("n", [40, 100, 401, 1000, 5003])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.875])
@pytest.mark.parametrize("window,beta", [(8, 20), (64, 20), (32, 5), (16, 1)])
def test_pyramid_budgets_match_an_independent_implementation(n_layer, n, ratio, window, beta):
    scores = np.zeros((n_layer, 1, n), dtype=np.float32)
    got = PyramidKVPress(ratio, window_size=window, beta=beta).layer_budgets(scores)
    assert got.dtype == np.int32 and got.tolist() == np_pyramid_budgets(n_layer, n, ratio, window, beta).tolist()


def test_pyramid_reports_its_budgets_where_other_presses_report_none():
    """PyramidKV's addition to SnapKV is its pyramid of layer budgets: ``compress`` hands it on (to
    ``kv_stats``); a press without an allocation of its own hands on None."""
    probe = fake_probe()  # 3 layers, 40 tokens: capacity 28 -> the pyramid 32, 20, 8
    _, budgets, selection = PyramidKVPress(0.5, window_size=8).compress(probe, 20, [39])
    assert budgets.tolist() == [32, 20, 8] == np_pyramid_budgets(3, 40, 0.5, 8, 20).tolist()
    assert selection.shape == (3, 2, 20)
    for press in (
        SnapKVPress(0.5, window_size=8),
        TOVAPress(0.5),
        KnormPress(0.5),
        StreamingLLMPress(0.5),
        RandomPress(0.5, seed=1),
    ):
        assert press.compress(probe, 20, [39])[1] is None
        assert press.layer_budgets(press.score(probe)) is None


@pytest.mark.parametrize("press_cls", PRESSES)
def test_token_level_mode_keeps_the_same_tokens_everywhere(press_cls):
    probe = fake_probe()
    press = press_cls(compression_ratio=0.5, per_head=False)
    if press.probe() is not None:  # read attention of the fake probe's window sizes
        press = press_cls(
            compression_ratio=0.5, per_head=False, **({"window_size": 8} if hasattr(press, "window_size") else {})
        )
    sel = press.select(press.score(probe), 20, [39])
    assert sel.shape == (3, 2, 20) and (sel == sel[0, 0]).all() and 39 in sel[0, 0]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("kvcompose:0.75", KVComposePress(compression_ratio=0.75)),
        (
            " KVCompose : 0.5 , scoring = reconstruct, per_head=false",
            KVComposePress(compression_ratio=0.5, scoring="reconstruct", per_head=False),
        ),
        ("snapkv:0.5,window_size=32,kernel_size=7", SnapKVPress(compression_ratio=0.5, window_size=32, kernel_size=7)),
        ("random:0.25,seed=none", RandomPress(compression_ratio=0.25, seed=None)),
        ("random:0.25,seed=3", RandomPress(compression_ratio=0.25, seed=3)),
        ("streaming_llm:0.875,n_sink=8", StreamingLLMPress(compression_ratio=0.875, n_sink=8)),
        ("kvcompose:0,add_v_norm=yes,window=5", KVComposePress(0.0, add_v_norm=True, window=5)),
        ("kvcompose:0.75,scoring=lookahead,lookahead=4", KVComposePress(0.75, scoring="lookahead", lookahead=4)),
        (
            "kvcompose:0.75,scoring=reconstruct,self_information=true",
            KVComposePress(0.75, scoring="reconstruct", self_information=True),
        ),
    ],
)
def test_press_specs_parse(spec, expected):
    from pykvcompose.presses import parse_press_spec

    assert parse_press_spec(spec) == expected


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nope:0.5", "unknown press 'nope'"),
        ("kvcompose", "needs a compression ratio"),
        ("kvcompose:", "needs a compression ratio"),
        ("kvcompose:window=3", "needs a compression ratio"),
        ("kvcompose:half", "compression_ratio must be a number, got 'half'"),
        ("kvcompose:1.5", "compression_ratio must be a number in"),
        ("snapkv:0.5,window=3", "snapkv has no field 'window'; fields: per_head, window_size, kernel_size"),
        ("snapkv:0.5,window_size", "expected key=value"),
        ("snapkv:0.5,window_size=big", "window_size must be an integer, got 'big'"),
        ("snapkv:0.5,window_size=0", "window_size must be an integer >= 1"),
        ("kvcompose:0.5,per_head=maybe", "per_head must be true or false"),
        ("kvcompose:0.5,scoring=magic", "scoring must be one of"),
        ("tova:0.5,per_head=true,per_head=false", "given twice"),
    ],
)
def test_bad_press_specs_name_the_problem(spec, message):
    from pykvcompose.presses import parse_press_spec

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_press_spec(spec)


# ---- the public names ---------------------------------------------------------------------------
def test_every_press_is_importable_from_the_top_level_and_listed_in_all():
    import pykvcompose
    from pykvcompose import presses

    for name in presses.__all__:
        assert getattr(pykvcompose, name) is getattr(presses, name), name
        assert name in pykvcompose.__all__, name
