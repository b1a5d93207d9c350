"""``src/summary.py``: print the parameter counts and GFLOPs per part of the configured SETR (built on the meta
device by :mod:`setr.models.summary`) and the JSON line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from setr.models.summary import build_meta_model, summarize_model
from setr.utils.launch import task_wrapper
from setr.utils.output import print_last_line
from setr.values import size_pair


# ------------------------------------------------------------------------------------------ printing
def render_table(summary: Mapping[str, Any], title: str, input_size: Sequence[int] | None):
    """A rich Table of the rows of :func:`summarize_model`."""
    from rich.table import Table

    ev, tr = summary["eval_flops"], summary["train_flops"]

    def g(f: int | None, note: str = "") -> str:
        return "-" if f is None else f"{f / 1e9:,.2f}{note}"

    if ev is not None:
        h, w = input_size
        caption = (
            f"GFLOPs: one forward pass, batch 1, 3x{h}x{w}, eval mode; auxiliary heads (*) only run in training and "
            "are not in the eval total. FLOPs = 2 x multiply-accumulates (matmuls, convolutions, attention) as "
            "torch.utils.flop_counter.FlopCounterMode counts them; norms, activations and resizes are not counted. "
            "The JSON line counts the neck's parameters in 'encoder' (official SETR-MLA: part of the backbone)."
        )
    else:
        caption = ("FLOPs not counted (summary.flops=false). The JSON line counts the neck's parameters in "
                   "'encoder' (official SETR-MLA: part of the backbone).")
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("GFLOPs", justify="right")
    rows = summary["rows"]
    for i, r in enumerate(rows):
        note = " *" if r.part == "auxiliary_heads" else ""
        table.add_row(r.label, f"{r.params:,}", f"{r.trainable:,}", g(r.flops, note), end_section=i == len(rows) - 1)
    inf = [r for r in rows if r.part != "auxiliary_heads"]
    table.add_row("inference model (no auxiliary heads)", f"{sum(r.params for r in inf):,}",
                  f"{sum(r.trainable for r in inf):,}", g(ev and ev["total"]))
    total, trainable = summary["total"]
    table.add_row("[bold]total[/bold]", f"[bold]{total:,}[/bold]", f"{trainable:,}",
                  g(tr and tr["total"], " (train)") if tr else "-")
    return table


# ------------------------------------------------------------------------------------------- the task
def summarize(cfg) -> dict[str, Any]:
    """Print the summary table of the composed config ``cfg`` and return the JSON line's dict."""
    from omegaconf import OmegaConf
    from rich.console import Console

    from setr.utils.config import check_config, extras

    check_config(cfg)
    opts = OmegaConf.to_container(cfg.get("summary") or OmegaConf.create({}), resolve=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    want_flops = bool(opts.get("flops", True))
    size_value = opts.get("input_size")
    size_key = "summary.input_size"
    if size_value is None:
        size_value, size_key = cfg.data.get("crop_size"), "data.crop_size"
    input_size = size_pair(size_value, size_key) if want_flops else None
    extras(cfg)  # after every check that needs nothing built: an error is the first thing printed

    model = build_meta_model(model_cfg)
    summary = summarize_model(model, input_size, flops=want_flops)
    head = (model_cfg.get("head") or {}).get("name", type(model.decode_head).__name__)
    title = f"SETR-{head} | {model.encoder.name} | {model_cfg['num_classes']} classes | data={cfg.data.get('name')}"
    console = Console()
    if not console.is_terminal:  # piped or captured: rich would assume 80 columns and wrap the labels
        console = Console(width=120)
    console.print(render_table(summary, title, input_size))
    return summary["json"]


@task_wrapper
def run(cfg) -> dict[str, Any]:
    """The job of ``src/summary.py``: print the table and the final JSON line."""
    result = summarize(cfg)
    print_last_line(result)
    return result
