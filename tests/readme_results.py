"""The README's "Results on real data" table, rendered from the committed results files.

Each row below is a template: `{FN:ARGS:FORMAT}` placeholders read a committed `recipes/<name>.results.json`
(or a benchmark's markdown table) and everything else is literal text (the task, the published figures).
tests/test_readme_results.py checks that README.md holds exactly these rendered rows, so a figure copied by
hand, or left behind when a table is re-run, fails. After re-running a table, print the rows to paste with
`python tests/readme_results.py`.

Placeholder functions (ARGS are row stages of the template's recipe, comma-separated):
  top1 s / std s            mean / std of top-1 over the row's seeds (points)
  err s / errstd s          errors per 10,000 test images, mean / std over seeds
  errpct s                  error in percent (100 - top-1)
  fileratio s               os.path.getsize of the dense fp32 file over that of the file the stage wrote
  d a,b                     top-1 of a minus top-1 of b (points)
  fewer s                   params / nonzero params (the dense count over the kept weights)
  smaller s                 serialized size of the dense model over the row's stored size
  macsx s                   the dense model's MACs over the row's
  ms s                      latency in ms as the table states it
  gap student,kd,teacher    share of the student-teacher error gap that distillation closes (percent)
  mdmin file,col / mdmax file,col   the smallest / largest cell of column col (1-based) of the first table
                            in benchmarks/<file>.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

# (recipe the row's placeholders read, the row as it appears in README.md)
ROWS: list[tuple[str, str]] = [
    ("mnist_han", "| LeNet-300-100, MNIST, pruned 92% + int8 ([mnist_han](recipes/mnist_han.md)) | "
                  "{err:l300:.0f} → {err:l300_han_int8:.0f} errors / 10k, {fewer:l300_han_int8:.1f}x fewer weights, "
                  "{smaller:l300_han_int8:.1f}x smaller (bitmask estimate) | 164 → 159, 12x (Han et al. 2015) |"),
    ("mnist_han", "| LeNet-5, MNIST, pruned 92% + int8 ([mnist_han](recipes/mnist_han.md)) | "
                  "{err:l5:.0f} → {err:l5_han_int8:.0f} errors / 10k, {fewer:l5_han_int8:.1f}x fewer weights, "
                  "{smaller:l5_han_int8:.1f}x smaller (bitmask estimate) | 80 → 77, 12x |"),
    ("mnist_deep_compression", "| LeNet-300-100 / LeNet-5, MNIST, Deep Compression: pruned 92%, weights shared (fc 5 "
                               "bits, conv 8), Huffman-coded file ([mnist_deep_compression]"
                               "(recipes/mnist_deep_compression.md)) | error {errpct:l300:.2f} → {errpct:l300_dc:.2f}%, "
                               "{fileratio:l300_dc:.1f}x smaller file / {errpct:l5:.2f} → {errpct:l5_dc:.2f}%, "
                               "{fileratio:l5_dc:.1f}x (os.path.getsize, fp32 file over deep file) | 1.64 → 1.58%, "
                               "40x / 0.80 → 0.74%, 39x (Han et al. 2016) |"),
    ("mnist_hinton", "| MLP 2x800 distilled from 2x1200, MNIST, 3 seeds ([mnist_hinton](recipes/mnist_hinton.md)) | "
                     "teacher {err:teacher:.0f}, student {err:student:.0f} ± {errstd:student:.0f}, distilled "
                     "{err:student_kd:.0f} ± {errstd:student_kd:.0f} errors: {gap:student,student_kd,teacher:.0f}% "
                     "of the gap closed | 67 / 146 / 74: 91% |"),
    ("cifar10_scratch", "| ResNet-20 trained from scratch by zoo, 40 epochs, 3 seeds, CIFAR-10 JPEG "
                        "([cifar10_scratch](recipes/cifar10_scratch.md)) | {top1:r20:.2f} ± {std:r20:.2f} (goal: 88.0; "
                        "MobileNet v2 0.5 and ShuffleNet v2 0.5 not run yet) | 92.60 (chenyaofo, lossless, 200 epochs) |"),
    ("cifar10_compress", "| ResNet-20 / ResNet-56 int8 PTQ, CIFAR-10 JPEG, imported weights + 1 epoch "
                         "([cifar10_compress](recipes/cifar10_compress.md)) | {top1:r20:.2f} → {top1:r20_int8:.2f} / "
                         "{top1:r56:.2f} → {top1:r56_int8:.2f} (goal: drop ≤ 0.5), {smaller:r20_int8:.1f}x / "
                         "{smaller:r56_int8:.1f}x smaller | |"),
    ("cifar10_quant", "| ResNet-20 / ResNet-56 int8 PTQ and QAT (1 epoch), eager x86 and XNNPACK, CIFAR-10 JPEG, "
                      "imported weights + 1 epoch ([cifar10_quant](recipes/cifar10_quant.md)) | ResNet-20 "
                      "{top1:r20:.2f}: PTQ {d:r20_ptq,r20:+.2f} (eager), {d:r20_ptq_xnn,r20:+.2f} (XNNPACK, "
                      "{ms:r20_ptq_xnn:.2f} ms on ExecuTorch vs {ms:r20:.2f} ms fp32 eager), QAT {d:r20_qat,r20:+.2f}; "
                      "ResNet-56 {top1:r56:.2f}: PTQ {d:r56_ptq,r56:+.2f}, QAT {d:r56_qat,r56:+.2f}; one seed each "
                      "| |"),
    ("cifar10_quant_mbv2", "| MobileNet v2 0.5 (CIFAR stem, 5 epochs from scratch) int8 PTQ and QAT, eager x86 and "
                           "XNNPACK, CIFAR-10 JPEG ([cifar10_quant_mbv2](recipes/cifar10_quant_mbv2.md)) | "
                           "{top1:mbv2:.2f}: PTQ {d:mbv2_ptq,mbv2:+.2f} (eager), {d:mbv2_ptq_xnn,mbv2:+.2f} (XNNPACK, "
                           "{ms:mbv2_ptq_xnn:.2f} ms on ExecuTorch vs {ms:mbv2:.2f} ms fp32 eager), QAT (XNNPACK) "
                           "{d:mbv2_qat_xnn,mbv2:+.2f}; one seed each | |"),
    ("cifar10_compress", "| ResNet-56 30% channels pruned, {macsx:r56_ch30:.2f}x fewer MACs, 1 fine-tune epoch, "
                         "imported weights ([cifar10_compress](recipes/cifar10_compress.md)) | {top1:r56:.2f} → "
                         "{top1:r56_ch30:.2f} ({d:r56_ch30,r56:+.1f}; the budget is 1 epoch) | 2.13x: +0.24 "
                         "(DepGraph), -0.60 (Group-L1), full retraining |"),
    ("cifar10_prune", "| ResNet-56 channel pruning by criterion, 1 fine-tune epoch, identical MACs per speed-up, "
                      "imported weights, one seed ([cifar10_prune](recipes/cifar10_prune.md)) | dense {top1:r56:.2f}; "
                      "{macsx:r56_2x_taylor:.2f}x: Taylor {d:r56_2x_taylor,r56:+.2f}, loss change "
                      "{d:r56_2x_loss,r56:+.2f}, L2 {d:r56_2x_mag,r56:+.2f}, Fisher {d:r56_2x_hessian,r56:+.2f}, "
                      "random {d:r56_2x_random,r56:+.2f}; {macsx:r56_25x_taylor:.2f}x: Taylor "
                      "{d:r56_25x_taylor,r56:+.2f}, Fisher {d:r56_25x_hessian,r56:+.2f}, loss change "
                      "{d:r56_25x_loss,r56:+.2f}, L2 {d:r56_25x_mag,r56:+.2f}, random {d:r56_25x_random,r56:+.2f} | "
                      "2.12x Group-L1 -0.60; 2.51x DepGraph w/o SL -0.17 (100+ epochs) |"),
    ("cifar10_compress", "| ResNet-56 90% weights pruned + int8, imported weights "
                         "([cifar10_compress](recipes/cifar10_compress.md)) | {top1:r56:.2f} → {top1:r56_w90_int8:.2f}, "
                         "{smaller:r56_w90_int8:.1f}x smaller (bitmask estimate) | |"),
    ("cifar10_kd", "| KD from ResNet-56, 1 epoch, 2 seeds ([cifar10_kd](recipes/cifar10_kd.md)) | ResNet-20: scratch "
                   "{top1:r20:.2f} ± {std:r20:.2f}, KD {top1:r20_kd:.2f} ± {std:r20_kd:.2f} (worse), FitNets "
                   "{top1:r20_fitnet:.2f} (1 seed); ShuffleNet v2 0.5: {top1:sv2:.1f} ± {std:sv2:.1f} vs "
                   "{top1:sv2_kd:.1f} ± {std:sv2_kd:.1f} (not significant) | converged schedules only (CRD Table 1, "
                   "CIFAR-100) |"),
    ("", "| TFLite ImageNet MobileNets imported ([benchmarks/tflite_import.md](benchmarks/tflite_import.md)) | "
         "agreement with the TFLite interpreter on 250 sample images: {mdmin:tflite_import,6}-{mdmax:tflite_import,6} "
         "with float activations, {mdmin:tflite_import,9}-{mdmax:tflite_import,9} with `activations=\"uint8\"` | |"),
    # tflite_import.md's columns 6 and 9 (1-based): "float: agreement" and "uint8: agreement"
    ("tflite_transfer_050", "| Transfer from ImageNet, 100 CIFAR-10 images per class, MobileNet v1 0.5 "
                            "([tflite_transfer_050](recipes/tflite_transfer_050.md)) | {top1:pretrained:.1f}% "
                            "fine-tuned, {top1:frozen:.1f}% classifier only, {top1:scratch:.1f}% from scratch (same 4 "
                            "epochs) | |"),
]


def _results(recipe: str) -> dict[str, dict[str, Any]]:
    """Rows of recipes/<recipe>.results.json by stage."""
    res = json.loads((REPO / "recipes" / f"{recipe}.results.json").read_text())
    return {r["stage"]: r for r in res["rows"]}


def _md_column(name: str, col: str) -> list[str]:
    """The cells of column `col` (1-based) in the first table of benchmarks/<name>.md."""
    lines = (REPO / "benchmarks" / f"{name}.md").read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    table = [ln for ln in lines[first:] if ln.startswith("|")]
    table = table[:next((i for i, ln in enumerate(lines[first:]) if not ln.startswith("|")), len(table))]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table]
    return [row[int(col) - 1] for row in cells[2:]]


def _pct(cell: str) -> float:
    return float(cell.rstrip("%"))


def _err(r: dict[str, Any]) -> float:
    return 100.0 * (100.0 - r["top1"])


FUNCS: dict[str, Callable[[dict[str, dict[str, Any]], list[str]], Any]] = {
    "top1": lambda R, a: R[a[0]]["top1"],
    "std": lambda R, a: R[a[0]]["top1_std"],
    "err": lambda R, a: _err(R[a[0]]),
    "errpct": lambda R, a: 100.0 - R[a[0]]["top1"],
    "fileratio": lambda R, a: R[a[0]]["file_ratio"],
    "errstd": lambda R, a: 100.0 * R[a[0]]["top1_std"],
    "d": lambda R, a: R[a[0]]["top1"] - R[a[1]]["top1"],
    "fewer": lambda R, a: R[a[0]]["params"] / R[a[0]]["nonzero_params"],
    "smaller": lambda R, a: R[a[0]]["compression_ratio"],
    "macsx": lambda R, a: R[a[0]]["dense_macs"] / R[a[0]]["macs"],
    "ms": lambda R, a: R[a[0]]["latency_ms"],
    "gap": lambda R, a: 100.0 * (_err(R[a[0]]) - _err(R[a[1]])) / (_err(R[a[0]]) - _err(R[a[2]])),
}
MD_FUNCS: dict[str, Callable[[list[str]], str]] = {
    "mdmin": lambda cells: min(cells, key=_pct), "mdmax": lambda cells: max(cells, key=_pct),
}
PLACEHOLDER = re.compile(r"\{(\w+):([^:{}]+)(?::([^{}]*))?\}")


def render(recipe: str, template: str) -> str:
    """One README row with every placeholder replaced by the value read from the committed files."""
    rows = _results(recipe) if recipe else {}

    def sub(m: re.Match) -> str:
        fn, args, fmt = m.group(1), m.group(2).split(","), m.group(3) or ""
        if fn in MD_FUNCS:
            return MD_FUNCS[fn](_md_column(args[0], args[1]))
        v = FUNCS[fn](rows, args)
        return format(v, fmt)

    return PLACEHOLDER.sub(sub, template)


def rendered_rows() -> list[str]:
    """Every row of the README's results table, rendered."""
    return [render(recipe, t) for recipe, t in ROWS]


if __name__ == "__main__":
    print("\n".join(rendered_rows()))
