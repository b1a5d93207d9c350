"""Metric reports: a rich table on the console, CSV / JSON files and a confusion-matrix PNG next to the run.

The numbers come from :func:`setr.metrics.scores_from_confusion` (a torchmetrics confusion matrix), so what is
printed, saved and logged is the same thing the trainer logged. Classes absent from both labels and predictions
have no IoU / accuracy: they are left empty in the CSV, ``null`` in the JSON and ``-`` in the table, and the means
skip them (mmsegmentation's ``nanmean``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUMMARY_KEYS = ("aAcc", "mIoU", "mAcc")


def _num(v: Any) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def score_rows(scores: Mapping[str, Any], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One ``{"class", "IoU", "Acc"}`` row per class (``None`` where the class never occurs)."""
    if len(scores["iou"]) != len(class_names):
        raise ValueError(f"{len(class_names)} class names for {len(scores['iou'])} scored classes")
    return [{"class": name, "IoU": _num(iou), "Acc": _num(acc)}
            for name, iou, acc in zip(class_names, scores["iou"], scores["acc"])]


def summary(scores: Mapping[str, Any]) -> dict[str, float | None]:
    return {k: _num(scores[k]) for k in SUMMARY_KEYS}


def render_table(scores: Mapping[str, Any], class_names: Sequence[str], title: str = "scores"):
    """A rich Table: per-class IoU and accuracy (percent), then aAcc / mIoU / mAcc."""
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("Acc", justify="right")
    rows = score_rows(scores, class_names)
    for i, r in enumerate(rows):
        table.add_row(r["class"], pct(r["IoU"]), pct(r["Acc"]), end_section=i == len(rows) - 1)
    s = summary(scores)
    table.add_row("[bold]mean[/bold]", f"[bold]{pct(s['mIoU'])}[/bold]", f"[bold]{pct(s['mAcc'])}[/bold]")
    table.add_row("aAcc (pixels)", "", pct(s["aAcc"]))
    return table


def print_table(scores: Mapping[str, Any], class_names: Sequence[str], title: str = "scores") -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # captured output: rich would otherwise assume 80 columns
        console = Console(width=100)
    console.print(render_table(scores, class_names, title))


def confusion_figure(confmat: torch.Tensor | np.ndarray, class_names: Sequence[str], title: str = "confusion"):
    """A matplotlib Figure of the row-normalised confusion matrix (rows: label, columns: prediction)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cm = np.asarray(confmat, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    side = min(4 + 0.35 * n, 40)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the label's pixels")
    ax.set_xlabel("prediction")
    ax.set_ylabel("label")
    ax.set_title(title)
    if n <= 60:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if norm[i, j] > 0.5 else "white")
    fig.tight_layout()
    return fig


def save_report(scores: Mapping[str, Any], class_names: Sequence[str], out_dir: str | Path,
                confmat: torch.Tensor | np.ndarray | None = None, prefix: str = "val") -> dict[str, Path]:
    """Write ``<prefix>_scores.csv`` (one row per class, then the means), ``<prefix>_scores.json`` and, with
    ``confmat``, ``<prefix>_confusion.png`` and ``<prefix>_confusion.csv`` (pixel counts) into ``out_dir``.

    Each file is written whole or not at all (:func:`setr.utils.output.atomic_write`): a kill or a full disk
    never leaves a half-written report that a reader would take for the result; a full disk stops with one line
    naming the file."""
    from setr.utils.output import atomic_write, write_text

    out = Path(out_dir)
    rows = score_rows(scores, class_names)
    s = summary(scores)
    paths = {"csv": out / f"{prefix}_scores.csv", "json": out / f"{prefix}_scores.json"}
    lines = [["class", "IoU", "Acc"]]
    lines += [[r["class"], "" if r["IoU"] is None else r["IoU"], "" if r["Acc"] is None else r["Acc"]] for r in rows]
    lines.append(["mean", "" if s["mIoU"] is None else s["mIoU"], "" if s["mAcc"] is None else s["mAcc"]])
    lines.append(["aAcc", "", "" if s["aAcc"] is None else s["aAcc"]])
    write_text(paths["csv"], _csv_text(lines))
    write_text(paths["json"], json.dumps({**s, "per_class": rows}, indent=2) + "\n")
    if confmat is not None:
        cm = np.asarray(confmat, dtype=np.int64)
        paths["confusion_csv"] = out / f"{prefix}_confusion.csv"
        write_text(paths["confusion_csv"], _csv_text(
            [["label \\ prediction", *class_names], *([name, *row.tolist()] for name, row in zip(class_names, cm))]))
        paths["confusion_png"] = out / f"{prefix}_confusion.png"
        fig = confusion_figure(cm, class_names, title=f"{prefix} confusion (row-normalised)")
        atomic_write(paths["confusion_png"], lambda f: fig.savefig(f, format="png", dpi=100))
    return paths


def _csv_text(rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    for row in rows:
        w.writerow(row)
    return buf.getvalue()


def wandb_table(scores: Mapping[str, Any], class_names: Sequence[str]):
    """The per-class ``wandb.Table`` (class, IoU, Acc; empty where a class never occurs)."""
    import wandb

    rows = score_rows(scores, class_names)
    return wandb.Table(columns=["class", "IoU", "Acc"], data=[[r["class"], r["IoU"], r["Acc"]] for r in rows])


def log_to_wandb(loggers: Sequence[Any], scores: Mapping[str, Any], class_names: Sequence[str], prefix: str = "val",
                 step: int | None = None, confusion_png: str | Path | None = None) -> int:
    """Log the per-class table (and the confusion PNG, when given) to every W&B logger in ``loggers``; returns
    how many."""
    from lightning.pytorch.loggers import WandbLogger

    targets = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not targets:
        return 0
    import wandb

    payload: dict[str, Any] = {f"{prefix}/per_class": wandb_table(scores, class_names)}
    if confusion_png is not None:
        payload[f"{prefix}/confusion"] = wandb.Image(str(confusion_png))
    if step is not None:
        payload["trainer/global_step"] = step
    for lg in targets:
        lg.experiment.log(payload)
    return len(targets)
