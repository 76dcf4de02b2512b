"""zoo.train_speed: precision and memory format chosen by configuration or by a measured probe."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import zoo
import zoo.train_speed as ts
from zoo.errors import ZooError
from zoo.train import TrainConfig, fit, lr_at


def _loaders(n: int = 64, bs: int = 16) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=bs, shuffle=False, drop_last=True), DataLoader(ds, batch_size=bs)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.create("mobilenet_v1", width=0.25, resolution=32, in_chans=1, num_classes=10, stem="cifar")


@pytest.mark.parametrize("key, value, allowed", [
    ("precision", "fp16", "'fp32', 'bf16', 'auto'"), ("precision", 32, "'fp32', 'bf16', 'auto'"),
    ("channels_last", "yes", "True, False or 'auto'"), ("schedule", "onecycle", "'linear'")])
def test_bad_speed_settings_name_the_allowed_values(key, value, allowed) -> None:
    with pytest.raises(ZooError, match=rf"{key}=.* is not allowed; expected .*{allowed}"):
        TrainConfig(**{key: value})


def test_resolve_refuses_unknown_values() -> None:
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ZooError, match=r"precision='half' is not allowed; expected one of fp32, bf16, auto"):
        ts.resolve("half", False, _model(), x)
    with pytest.raises(ZooError, match=r"channels_last='nhwc' is not allowed"):
        ts.resolve("fp32", "nhwc", _model(), x)


def test_bf16_without_native_support_falls_back_to_fp32_with_one_line(monkeypatch) -> None:
    monkeypatch.setattr(ts, "cpu_flags", lambda: {"avx2", "fma"})
    said: list[str] = []
    c = ts.resolve("bf16", False, _model(), torch.zeros(4, 1, 32, 32), log=said.append)
    assert (c.precision, c.channels_last) == ("fp32", False)
    assert len(said) == 1 and "no native bf16" in said[0] and "fp32" in said[0]
    c = ts.resolve("auto", False, _model(), torch.zeros(4, 1, 32, 32), log=said.append)
    assert c.precision == "fp32" and "no native bf16" in c.reason and len(said) == 1  # auto: no probe, no warning


def test_native_bf16_reads_the_cpu_flags(monkeypatch) -> None:
    for flags, want in (({"avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True), ({"avx512f", "avx512_vnni"}, False)):
        monkeypatch.setattr(ts, "cpu_flags", lambda f=flags: f)
        assert ts.native_bf16("cpu") is want


def test_auto_keeps_the_fastest_variant_only_when_clearly_faster(monkeypatch) -> None:
    monkeypatch.setattr(ts, "cpu_flags", lambda: {"avx512_bf16"})
    x = torch.zeros(4, 1, 32, 32)
    for rates, want in (({("fp32", False): 100, ("bf16", False): 200, ("fp32", True): 120, ("bf16", True): 250},
                         ("bf16", True)),
                        ({("fp32", False): 100, ("bf16", False): 80, ("fp32", True): 103, ("bf16", True): 90},
                         ("fp32", False)),  # 3% is within the margin: keep the default
                        ({("fp32", False): 100, ("bf16", False): 79, ("fp32", True): 117, ("bf16", True): 90},
                         ("fp32", True))):  # ShuffleNet v2's pattern: bf16 slower, NHWC alone faster
        monkeypatch.setattr(ts, "probe", lambda *a, r=rates, **k: dict(r))
        c = ts.resolve("auto", "auto", _model(), x)
        assert (c.precision, c.channels_last) == want, (rates, c)
        assert "probe (images/s:" in c.reason


def test_probe_times_every_variant_and_leaves_model_and_rng_alone() -> None:
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(5)
    state = torch.get_rng_state()
    ips = ts.probe(m, torch.zeros(4, 1, 32, 32), ("fp32", "bf16"), (False, True), steps=1, rounds=2)
    assert set(ips) == {("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)}
    assert all(v > 0 for v in ips.values())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)


def test_fit_in_bf16_trains_records_the_choice_and_resumes_with_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ts, "cpu_flags", lambda: {"avx512_bf16"})  # autocast bf16 runs (slowly) on any CPU
    tr, va = _loaders()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, schedule="constant", precision="bf16", channels_last=True,
                      progress=False)  # constant: a 1-epoch run then has the same learning rates
    full = fit(_model(), tr, va, cfg, out_dir=tmp_path / "full")
    assert (full.precision, full.memory_format) == ("bf16", "channels_last")
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in full.history)
    # one epoch, then resume on a machine that would now pick otherwise: the run keeps its saved choice
    fit(_model(), tr, va, TrainConfig(**{**cfg.to_dict(), "epochs": 1}), out_dir=tmp_path / "half")
    monkeypatch.setattr(ts, "cpu_flags", lambda: set())
    resumed = fit(_model(), tr, va, cfg, out_dir=tmp_path / "half", resume=True)
    assert resumed.precision == "bf16"
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]  # bit-exact continuation


def test_bf16_training_differs_from_fp32_but_fp32_master_weights_stay_float(monkeypatch) -> None:
    tr, va = _loaders()
    m32, m16 = _model(), _model()
    base = dict(epochs=1, batch_size=16, lr=0.05, progress=False)
    fit(m32, tr, va, TrainConfig(**base))
    monkeypatch.setattr(ts, "cpu_flags", lambda: {"avx512_bf16"})
    fit(m16, tr, va, TrainConfig(**base, precision="bf16"))
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(m32.parameters(), m16.parameters()))


def test_linear_schedule_goes_to_zero_after_warmup() -> None:
    cfg = TrainConfig(epochs=4, lr=0.4, schedule="linear", warmup_epochs=1)
    lrs = [lr_at(cfg, s, 10) for s in range(40)]
    assert lrs[9] == pytest.approx(0.4) and lrs[10] == pytest.approx(0.4)
    assert lrs[25] == pytest.approx(0.4 * (1 - 15 / 30))
    assert lrs[-1] == pytest.approx(0.4 / 30) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_auto_without_a_batch_to_probe_keeps_the_default(monkeypatch) -> None:
    monkeypatch.setattr(ts, "cpu_flags", lambda: {"avx512_bf16"})
    c = ts.resolve("auto", "auto", _model(), None)
    assert (c.precision, c.channels_last) == ("fp32", False) and "no training batch" in c.reason
    assert ts.resolve("bf16", True, _model(), None).precision == "bf16"  # explicit values are kept
