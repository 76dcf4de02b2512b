"""ShuffleNet v1 below width 1.0 (Zhang et al. 2017, Table 2): a 12-channel stem (8 for g = 8), and the
24-channel stem of earlier zoo versions through `stem_channels=24`."""

from __future__ import annotations

import pytest

import zoo
from zoo.profile import count_macs, count_params

GROUPS = (1, 2, 3, 4, 8)


@pytest.mark.parametrize("width,mflops", [(0.5, 38), (0.25, 13)])
def test_small_widths_match_table_2(width, mflops):
    """g = 3 measured here; every g is a `zoo tables` row, checked within 5% by tests/test_models.py."""
    refs = {r.label: r for r in zoo.model_card("shufflenet_v1").references}
    for g in GROUPS:
        assert zoo.create("shufflenet_v1", groups=g, width=width).stem.conv.out_channels == (8 if g == 8 else 12)
        ref = refs[f"ShuffleNet {width:g}x (g={g})"]
        assert ref.macs == mflops * 1_000_000 and ref.macs_rtol == 0.05
    m = zoo.create("shufflenet_v1", groups=3, width=width)
    assert abs(count_macs(m, (3, 224, 224)) / (mflops * 1e6) - 1) <= 0.05


def test_width_one_and_above_keep_the_24_channel_stem():
    for w in (1.0, 1.5, 2.0):
        assert zoo.create("shufflenet_v1", width=w).stem.conv.out_channels == 24
    assert count_params(zoo.create("shufflenet_v1")) == 1_865_728  # Table 1 network, unchanged


def test_stem_channels_keeps_the_earlier_network():
    """recipes/digits_compress.yaml's ShuffleNet (g = 3, width 0.5, 10 classes, 1 channel): 242,266 params."""
    m = zoo.create("shufflenet_v1", groups=3, width=0.5, num_classes=10, in_chans=1, stem_channels=24)
    assert m.stem.conv.out_channels == 24 and count_params(m) == 242_266
    assert m.spec.kwargs["stem_channels"] == 24
    small = zoo.create("shufflenet_v1", groups=3, width=0.5, num_classes=10, in_chans=1)
    assert count_params(small) < count_params(m)


@pytest.mark.parametrize("kw", [{"groups": 8, "stem_channels": 12}, {"groups": 3, "stem_channels": 25},
                                {"stem_channels": -3}, {"stem_channels": 200}, {"stem_channels": 2.5}])
def test_bad_stem_channels(kw):
    with pytest.raises(zoo.ZooError, match="stem_channels"):
        zoo.create("shufflenet_v1", **kw)
