"""`zoo weights import` / zoo.weights.import_state_dict: foreign safetensors state dicts mapped by structure.

The CIFAR-10 check uses the offline pretrained ResNets (Idelbayev's pytorch_resnet_cifar10, option-A
shortcuts) and the CIFAR-10 JPEG q75 test copy under zoo.data.sources.data_root(); it skips when absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import yaml
from safetensors.torch import save_file

import zoo
from zoo.cli import main
from zoo.data import get_loaders
from zoo.data.sources import data_root
from zoo.recipe import run_recipe
from zoo.train import evaluate
from zoo.weights import import_state_dict, read_checkpoint
from zoo.weights.foreign import foreign_order

from toy_nets import random_bn  # (tests/ is on sys.path)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRETRAINED = data_root() / "pretrained" / "cifar10_resnets_akamaster"
CIFAR_TEST = data_root() / "cifar10" / "test.npz"


class _RefBlock(nn.Module):
    """Idelbayev's BasicBlock, option A: the shortcut pads planes // 4 zero channels on each side."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if stride != 1 or cin != planes else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.pad else x
        return F.relu(out + sc)


class _RefResNet(nn.Module):
    """Keys conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}, linear, as in the published checkpoints."""

    def __init__(self, n: int):
        super().__init__()
        self.conv1, self.bn1, cin = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(_RefBlock(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _reference(n: int = 3) -> nn.Module:
    torch.manual_seed(0)
    ref = random_bn(_RefResNet(n))  # distinct weight / bias / statistics per BN, so a swap shows
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(7)
    return ref


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_reference_resnet_imports_and_reproduces_its_outputs(tmp_path):
    ref = _reference()
    src = _save(ref.state_dict(), tmp_path / "foreign.safetensors")
    out = import_state_dict(src, "resnet20", tmp_path / "r20.safetensors", classes="cifar10", mean=MEAN, std=STD)
    m = zoo.create("resnet20", weights=str(out)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), ref(x), rtol=1e-5, atol=1e-6)
    assert m.spec.kwargs["shortcut"] == "A"
    assert m.spec.mean == list(MEAN) and m.spec.std == list(STD)
    assert m.spec.classes[:2] == ["airplane", "automobile"] and len(m.spec.classes) == 10
    ck = read_checkpoint(out)
    assert ck.metadata["imported_from"]["file"] == "foreign.safetensors"


def test_foreign_order_recovers_module_order_from_sorted_names():
    """Safetensors sorts keys by name; the recovered order is the modules' registration order."""
    for build in (lambda: _RefResNet(12), torchvision.models.resnet50, torchvision.models.mobilenet_v2):
        sd = build().state_dict()
        want = [k for k in sd if not k.endswith("num_batches_tracked")]
        assert foreign_order({k: tuple(sd[k].shape) for k in sorted(sd)}) == want


def test_shape_mismatch_names_first_key_and_both_shapes(tmp_path):
    src = _save(_reference().state_dict(), tmp_path / "foreign.safetensors")
    with pytest.raises(zoo.ZooError) as e:  # option B has 1x1 projections where the file has none
        import_state_dict(src, "resnet20", tmp_path / "x.safetensors", shortcut="B")
    msg = str(e.value)
    assert ("foreign 'layer2.1.conv1.weight' (32, 32, 3, 3) does not fit zoo 'stages.1.0.downsample.conv.weight' "
            "(32, 16, 1, 1)") in msg
    assert "97 tensors, the zoo model 107" in msg
    assert not (tmp_path / "x.safetensors").exists()


def test_count_mismatch_says_how_many(tmp_path):
    sd = _reference().state_dict()
    short = _save({k: v for k, v in sd.items() if not k.startswith("linear.")}, tmp_path / "short.safetensors")
    with pytest.raises(zoo.ZooError, match=r"95 tensors, the zoo model 97 .*first unfilled zoo tensor "
                                           r"'classifier.weight'"):
        import_state_dict(short, "resnet20", tmp_path / "x.safetensors")
    long = _save({**sd, "linear.scale": torch.ones(10)}, tmp_path / "long.safetensors")  # after linear.bias
    with pytest.raises(zoo.ZooError, match=r"98 tensors, the zoo model 97 .*first unmatched foreign tensor "
                                           r"'linear.scale'"):
        import_state_dict(long, "resnet20", tmp_path / "x.safetensors")


def test_pickles_and_missing_files_are_refused(tmp_path):
    sd = _reference().state_dict()
    for name in ("model.pt", "model.pth", "model.bin"):
        with pytest.raises(zoo.ZooError, match=rf"refusing to load .*{name}.*pickle"):
            import_state_dict(tmp_path / name, "resnet20", tmp_path / "x.safetensors")
    disguised = tmp_path / "disguised.safetensors"
    torch.save(sd, disguised)  # written only, never loaded
    with pytest.raises(zoo.ZooError, match="refusing to load .*disguised.safetensors.*zip archive"):
        import_state_dict(disguised, "resnet20", tmp_path / "x.safetensors")
    with pytest.raises(zoo.ZooError, match=r"weights file '.*absent.safetensors' does not exist"):
        import_state_dict(tmp_path / "absent.safetensors", "resnet20", tmp_path / "x.safetensors")


def test_bad_options(tmp_path):
    src = _save(_reference().state_dict(), tmp_path / "foreign.safetensors")
    out = tmp_path / "x.safetensors"
    with pytest.raises(zoo.ZooError, match="classes='cifar11' is not allowed; expected a named set"):
        import_state_dict(src, "resnet20", out, classes="cifar11")
    with pytest.raises(zoo.ZooError, match="give both"):
        import_state_dict(src, "resnet20", out, mean=MEAN)
    with pytest.raises(zoo.ZooError, match=r"mean has 2 values, but resnet20\(.*\) has in_chans=3; give one value "
                                           r"per input channel"):
        import_state_dict(src, "resnet20", out, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(zoo.ZooError, match="shortcut='C' is not supported; allowed: 'A', 'B'"):
        import_state_dict(src, "resnet20", out, shortcut="C")
    with pytest.raises(zoo.ZooError, match="is the foreign file itself"):
        import_state_dict(src, "resnet20", src)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    m = zoo.create("resnet20", weights=str(import_state_dict(src, "resnet20", out, classes=names)))
    assert m.spec.classes[9] == "class 9" and m.spec.mean is None


def test_cli_import(tmp_path, capsys):
    src = _save(_reference().state_dict(), tmp_path / "foreign.safetensors")
    out = tmp_path / "r20.safetensors"
    code = main(["weights", "import", str(src), "--model", "resnet20", "--kw", "shortcut=A", "--out", str(out),
                 "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--classes", "cifar10"])
    assert code == 0 and "shortcut='A'" in capsys.readouterr().out
    assert zoo.create("resnet20", weights=str(out)).spec.std == list(STD)
    assert main(["weights", "import", str(src), "--model", "resnet32", "--out", str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: cannot import") and "does not fit zoo" in err and "Traceback" not in err
    assert main(["weights", "import", str(src), "--model", "resnet20", "--out", str(out), "--mean", "a,b"]) == 2
    assert "--mean 'a,b' is not allowed" in capsys.readouterr().err
    assert main(["weights", "import", str(src), "--model", "resnet20", "--out", str(out), "--activations", "uint8"]) == 2
    assert "--activations uint8 is only for .tflite files" in capsys.readouterr().err


@pytest.mark.skipif(not (PRETRAINED / "resnet20.safetensors").is_file() or not CIFAR_TEST.is_file(),
                    reason=f"needs the offline pretrained CIFAR ResNets ({PRETRAINED}) and the CIFAR-10 JPEG "
                           f"test copy ({CIFAR_TEST}); set $ZOO_DATA or place ../shared/data")
def test_pretrained_resnet20_top1_on_cifar10_jpeg(tmp_path):
    out = import_state_dict(PRETRAINED / "resnet20.safetensors", "resnet20", tmp_path / "r20.safetensors",
                            classes="cifar10", mean=MEAN, std=STD)
    m = zoo.create("resnet20", weights=str(out)).eval()
    _, val, info = get_loaders("cifar10", (3, 32, 32), batch_size=500, mean=MEAN, std=STD)  # ToTensor + normalise
    assert info.num_val == 10_000 and info.title == "CIFAR-10 (JPEG q75 copy)"
    top1 = evaluate(m, val)["top1"]
    assert top1 == pytest.approx(81.03, abs=0.05)  # CIFAR-10 (JPEG q75 copy); 91.73 published on the lossless set


def test_recipe_train_stage_starts_from_a_foreign_state_dict(tmp_path):
    ref = _reference()
    src = _save(ref.state_dict(), tmp_path / "foreign.safetensors")
    recipe = {"name": "t", "dataset": {"name": "digits", "input_size": [3, 32, 32]}, "seed": 0,
              "defaults": {"train": {"epochs": 1, "batch_size": 64, "lr": 0.01}},
              "stages": {"r20": {"type": "train", "model": "resnet20", "init": str(src), "freeze_backbone": True}}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, out=tmp_path / "run", quick=True, log=lambda s: None)
    m = zoo.create("resnet20", weights=str(tmp_path / "run" / "r20" / "seed0" / "model.safetensors"))
    assert torch.equal(m.stages[1][0].conv1.conv.weight, ref.layer2[0].conv1.weight)  # the foreign weights
