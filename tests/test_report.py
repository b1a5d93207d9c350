"""Metrics and reports: hand-made predictions, every figure checked against values computed here by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from setr.metrics import SegMetrics
from setr.report import render_table, save_report

NAMES = ["road", "car", "tree", "sky"]


def _hand_made():
    """4 classes, 255 = ignore. 'sky' (3) never occurs in labels or predictions."""
    target = torch.tensor([[0, 0, 0, 1],
                           [0, 1, 1, 1],
                           [2, 2, 255, 255],
                           [2, 2, 2, 0]])
    pred = torch.tensor([[0, 0, 1, 1],
                         [0, 1, 1, 2],
                         [2, 2, 0, 3],  # predictions on ignored pixels do not count
                         [2, 0, 2, 0]])
    return pred, target


def _by_hand(pred: np.ndarray, target: np.ndarray, n: int):
    """Plain loops over pixels: no confusion matrix, no torch."""
    valid = [(p, t) for p, t in zip(pred.ravel(), target.ravel()) if t != 255]
    iou, acc = [], []
    for c in range(n):
        tp = sum(1 for p, t in valid if p == c and t == c)
        fp = sum(1 for p, t in valid if p == c and t != c)
        fn = sum(1 for p, t in valid if p != c and t == c)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else float("nan"))
        acc.append(tp / (tp + fn) if tp + fn else float("nan"))
    aacc = sum(1 for p, t in valid if p == t) / len(valid)
    present = [i for i in iou if not np.isnan(i)]
    present_acc = [a for a in acc if not np.isnan(a)]
    return {"aAcc": aacc, "mIoU": sum(present) / len(present), "mAcc": sum(present_acc) / len(present_acc),
            "iou": iou, "acc": acc}


def test_scores_equal_hand_computed_values():
    pred, target = _hand_made()
    m = SegMetrics(num_classes=4)
    # fed in two halves, as two batches would be
    m.update(pred[None, :2], target[None, :2])
    m.update(pred[None, 2:], target[None, 2:])
    got = m.compute()
    want = _by_hand(pred.numpy(), target.numpy(), 4)
    # the same figures written out: 14 valid pixels, 11 correct
    assert want["aAcc"] == pytest.approx(11 / 14)
    assert want["iou"][:3] == pytest.approx([4 / 6, 3 / 5, 4 / 6])
    assert want["acc"][:3] == pytest.approx([4 / 5, 3 / 4, 4 / 5])
    assert np.isnan(want["iou"][3]) and np.isnan(want["acc"][3])
    for key in ("aAcc", "mIoU", "mAcc"):
        assert float(got[key]) == pytest.approx(want[key]), key
    np.testing.assert_allclose(got["iou"].numpy(), want["iou"], equal_nan=True)
    np.testing.assert_allclose(got["acc"].numpy(), want["acc"], equal_nan=True)


def test_logits_input_and_ignore_index():
    pred, target = _hand_made()
    logits = torch.nn.functional.one_hot(pred, 4).permute(2, 0, 1)[None].float()
    m = SegMetrics(num_classes=4)
    m.update(logits, target[None])
    assert float(m.compute()["aAcc"]) == pytest.approx(11 / 14)
    assert int(m.confmat.sum()) == 14  # the two ignored pixels are not counted


def test_report_files_hold_the_same_figures(tmp_path):
    pred, target = _hand_made()
    m = SegMetrics(num_classes=4)
    m.update(pred[None], target[None])
    scores = m.compute()
    want = _by_hand(pred.numpy(), target.numpy(), 4)
    paths = save_report(scores, NAMES, tmp_path, m.confmat, prefix="test")
    assert {p.name for p in paths.values()} == {"test_scores.csv", "test_scores.json", "test_confusion.csv",
                                                "test_confusion.png"}

    data = json.loads((tmp_path / "test_scores.json").read_text())
    assert data["mIoU"] == pytest.approx(want["mIoU"]) and data["aAcc"] == pytest.approx(want["aAcc"])
    assert data["mAcc"] == pytest.approx(want["mAcc"])
    assert [r["class"] for r in data["per_class"]] == NAMES
    assert [r["IoU"] for r in data["per_class"][:3]] == pytest.approx(want["iou"][:3])
    assert data["per_class"][3] == {"class": "sky", "IoU": None, "Acc": None}

    rows = list(csv.reader(Path(tmp_path / "test_scores.csv").read_text().splitlines()))
    assert rows[0] == ["class", "IoU", "Acc"]
    assert rows[2][0] == "car" and float(rows[2][1]) == pytest.approx(0.6) and float(rows[2][2]) == pytest.approx(0.75)
    assert rows[4] == ["sky", "", ""]
    assert rows[5][0] == "mean" and float(rows[5][1]) == pytest.approx(want["mIoU"])
    assert rows[6][0] == "aAcc" and float(rows[6][2]) == pytest.approx(11 / 14)

    cm = list(csv.reader(Path(tmp_path / "test_confusion.csv").read_text().splitlines()))
    assert cm[0] == ["label \\ prediction", *NAMES]
    # counted by hand from the arrays above: label road (5 pixels) -> 4 road, 1 car
    assert [int(v) for v in cm[1][1:]] == [4, 1, 0, 0]
    assert [int(v) for v in cm[2][1:]] == [0, 3, 1, 0]
    assert [int(v) for v in cm[3][1:]] == [1, 0, 4, 0]
    from PIL import Image

    with Image.open(tmp_path / "test_confusion.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200


def test_table_shows_percentages_and_absent_classes():
    from rich.console import Console

    pred, target = _hand_made()
    m = SegMetrics(num_classes=4)
    m.update(pred[None], target[None])
    console = Console(width=100, record=True)
    console.print(render_table(m.compute(), NAMES, "hand-made"))
    text = console.export_text()
    assert "66.67" in text and "60.00" in text  # IoU of road / tree, car
    assert "78.57" in text and "64.44" in text  # aAcc, mIoU
    sky = next(ln for ln in text.splitlines() if "sky" in ln)
    assert "-" in sky
