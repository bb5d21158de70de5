"""Press fields: validation and the kvpress conventions."""

import pytest

from pykvcompose import KVComposePress
from pykvcompose.presses import BasePress

PRESSES = [KVComposePress]


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
        ("head_consensus", 1.5),
        ("head_consensus", -0.1),
        ("head_consensus", "all"),
        ("starved_layers", "mean"),
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
    assert p.scoring == "reconstruct"
