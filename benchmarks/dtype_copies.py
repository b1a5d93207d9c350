"""Audit of the dtype copies of one SETR training step under bf16 autocast (not a test; no timing).

Runs one forward + loss (``SETRModule.compute_loss``, the default fused loss path) + backward of a SETR on a random
batch under ``torch.autocast(dtype=bfloat16)`` and records, with a ``TorchDispatchMode``, every operator that
changes a tensor's dtype (``aten._to_copy`` -- what ``.to(dtype)``, ``.float()`` and autocast's casts become --
and ``aten.copy_`` between dtypes), with its shape, dtypes and bytes (read + written). Each copy is put in a
category from where it happens: a parameter cast by autocast, an activation cast at the input of a linear /
convolution, inside the loss, a gradient cast in the backward pass (which autograd node), ... Prints a table
(category, count, MB) and a final JSON line.

    .venv/bin/python benchmarks/dtype_copies.py --size 256 --batch 1 --encoder vit_base --head mla
    .venv/bin/python benchmarks/dtype_copies.py --size 512 --batch 2 --encoder vit_large --device cuda

CPU and CUDA autocast have different op lists (``torch/csrc/autocast``, docs "Autocast Op Reference"): CUDA
runs ``layer_norm`` / ``softmax`` / losses in float32 (casting bf16 inputs up), CPU runs ``layer_norm`` in the
input's dtype. Copies made inside a CPU kernel (TensorIterator's mixed-dtype inputs, e.g. a bf16 + fp32 add) are
not operators and are not seen here (on CUDA those casts happen in the kernel, no copy). Use ``--device cuda``
for the CUDA list.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
_CASTS = {torch.ops.aten._to_copy.default}
_COPIES = {torch.ops.aten.copy_.default}
_CLONES = {torch.ops.aten.clone.default}  # .contiguous() of a permuted map: a layout copy (same dtype)
_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_SHORT = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class DtypeCopyAudit(TorchDispatchMode):
    """Records every dtype-changing copy: ``records`` is a list of dicts (op, phase, module, node, frame, shape,
    src, dst, bytes, param). ``model``: the network, for module names (forward hooks keep a stack of the module
    being run) and to tell parameters from activations."""

    def __init__(self, model: nn.Module | None = None, layout: bool = True) -> None:
        super().__init__()
        self.layout = layout  # also record same-dtype layout copies (aten.clone: .contiguous())
        self.records: list[dict] = []
        self._names = {m: n for n, m in model.named_modules()} if model is not None else {}
        self._params = {p.data_ptr(): n for n, p in model.named_parameters()} if model is not None else {}
        self._stack: list[nn.Module] = []
        self._hooks = []

    def __enter__(self):
        if self._names:
            self._hooks = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                           nn.modules.module.register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _pre(self, module, args):
        if module in self._names:
            self._stack.append(module)

    def _post(self, module, args, out):
        if module in self._names and self._stack and self._stack[-1] is module:
            self._stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = dst = None
        if func in _CASTS and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            src, dst = args[0], out
        elif func in _COPIES and isinstance(args[1], torch.Tensor):
            src, dst = args[1], args[0]
        if src is not None and src.dtype != dst.dtype and dst.numel():
            self._record(func, src, dst)
        elif self.layout and func in _CLONES and isinstance(out, torch.Tensor) and out.numel():
            self._record(func, args[0], out)
        return out

    def _record(self, func, src: torch.Tensor, dst: torch.Tensor) -> None:
        node = torch._C._current_autograd_node()
        module = self._stack[-1] if self._stack else None
        frame = _frame()
        self.records.append({
            "op": func.__name__, "phase": "backward" if node is not None else "forward",
            "node": type(node).__name__ if node is not None else None, "node_name": node.name() if node else None,
            "module": self._names.get(module) if module is not None else None,
            "module_type": type(module).__name__ if module is not None else None, "frame": frame,
            "shape": tuple(dst.shape), "src": src.dtype, "dst": dst.dtype,
            "bytes": src.numel() * src.element_size() + dst.numel() * dst.element_size(),
            "param": self._params.get(src.data_ptr()) if src.numel() else None,
            "param_grad": _feeds_a_parameter(node),
        })


def _feeds_a_parameter(node) -> bool:
    """True when the backward node's gradient goes straight to a leaf (``AccumulateGrad``): the backward of
    autocast's weight cast, whose output is the parameter's float32 gradient."""
    if node is None:
        return False
    return any(type(n).__name__ == "AccumulateGrad" for n, _ in node.next_functions if n is not None)


def _frame() -> str:
    """``file:line (function)`` of the innermost Python frame in setr or timm code (the line that made the copy,
    or the call that autocast's cast belongs to)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if ("/setr/" in name or "/timm/" in name) and "dtype_copies" not in name:
            short = "setr/" + name.split("/setr/")[-1] if "/setr/" in name else "timm/" + name.split("/timm/")[-1]
            return f"{short}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


def category(r: dict) -> str:
    """A short label of where a copy comes from (see the module docstring)."""
    d = f"{_SHORT.get(r['src'], r['src'])}->{_SHORT.get(r['dst'], r['dst'])}"
    frame, mod, mtype = r["frame"], r["module"] or "", r["module_type"] or ""
    if r["src"] == r["dst"]:
        where = frame.split(" (")[-1].rstrip(")") if r["phase"] == "forward" else r["node"]
        return f"(layout copy, {_SHORT.get(r['dst'])}) {r['phase'][:3]} {mtype or where}"
    if r["phase"] == "forward":
        if r["param"] is not None:
            return f"fwd weight cast (autocast) {d}"
        if "seg_loss.py" in frame:
            return f"fwd loss: logits {d}"
        if "resize.py" in frame:
            return f"fwd resize {d}"
        where = "encoder" if mod.startswith("encoder") else "heads/neck" if mod else "other"
        if mtype in ("Linear", "Conv2d"):
            return f"fwd {where}: {mtype} input {d} (autocast)"
        if "LayerNorm" in mtype:
            return f"fwd {where}: LayerNorm {d}"
        if "BatchNorm" in mtype or "GroupNorm" in mtype:
            return f"fwd {where}: {mtype} {d}"
        return f"fwd {where} {mtype or '-'}: {d} @ {frame}"
    node = r["node"] or ""
    if "UpsampledCrossEntropy" in node or "seg_loss.py" in frame:
        return f"bwd loss: {d}"
    if node.startswith("ToCopyBackward"):
        if r["param_grad"]:
            return f"bwd weight grad {d}"
        return f"bwd activation grad {d} (of an fwd cast)"
    return f"bwd {node}: grad {d}"


def tally(records: list[dict], model: nn.Module) -> dict[str, dict[str, float]]:
    """{category: {"count", "mb"}} (MB: bytes read + written, 1e6)."""
    out: dict[str, dict[str, float]] = collections.OrderedDict()
    for r in records:
        c = category(r)
        e = out.setdefault(c, {"count": 0, "mb": 0.0})
        e["count"] += 1
        e["mb"] += r["bytes"] / 1e6
    return out


def build_module(encoder: str, head: str, size: int, classes: int, overrides: tuple[str, ...] = ()):
    """The ``SETRModule`` of ``model/encoder=<encoder> model/head=<head>`` at crop ``size`` (random weights)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from setr.checkpoint import ModelRecord
    from setr.training import SETRModule

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("summary", overrides=[f"model/encoder={encoder}", f"model/head={head}",
                                            f"data.crop_size={size}", f"data.num_classes={classes}",
                                            "model.encoder.pretrained=null", *overrides])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    record = ModelRecord(model=model, class_names=[str(i) for i in range(classes)], palette=[], crop_size=size)
    return SETRModule(record=record)


def audit_step(module, batch: int, size: int, device: str = "cpu", dtype=torch.bfloat16, seed: int = 0,
               warmup: int = 1, layout: bool = True) -> list[dict]:
    """The records of one training step (forward, compute_loss, backward) of ``module`` under autocast to
    ``dtype`` (None: no autocast, float32), after ``warmup`` unrecorded steps (which fill once-per-run caches:
    the resize matrices of each dtype)."""
    module.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    classes = module.model.num_classes
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, classes, (batch, size, size), generator=gen).to(device)
    audit = DtypeCopyAudit(module.model, layout=layout)
    for i in range(warmup + 1):
        module.zero_grad(set_to_none=True)
        with audit if i == warmup else contextlib.nullcontext():
            with torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss, _ = module.compute_loss(module(x), y)
            loss.backward()
    return audit.records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="vit_base", help="conf/model/encoder/<name>.yaml")
    ap.add_argument("--head", default="mla", help="conf/model/head/<name>.yaml")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--detail", action="store_true", help="also print the 25 largest single copies")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded steps first (fill the resize caches)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the model, e.g. model.norm=gn")
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    module = build_module(args.encoder, args.head, args.size, args.classes, tuple(args.overrides))
    records = audit_step(module, args.batch, args.size, args.device, getattr(torch, args.dtype), warmup=args.warmup)
    table = tally(records, module.model)
    w = max([len(c) for c in table] + [8])
    print(f"{'category':<{w}}  {'count':>6}  {'MB':>10}")
    for c, e in sorted(table.items(), key=lambda kv: -kv[1]["mb"]):
        print(f"{c:<{w}}  {e['count']:>6}  {e['mb']:>10.1f}")
    total = {"count": sum(e["count"] for e in table.values()), "mb": sum(e["mb"] for e in table.values())}
    print(f"{'total':<{w}}  {total['count']:>6}  {total['mb']:>10.1f}")
    if args.detail:
        for r in sorted(records, key=lambda r: -r["bytes"])[:25]:
            print(f"  {r['bytes'] / 1e6:9.1f} MB {r['phase']:8} {category(r)[:50]:50} {r['shape']} "
                  f"{r['module'] or r['node_name']} {r['frame']}")
    print(json.dumps({"encoder": args.encoder, "head": args.head, "size": args.size, "batch": args.batch,
                      "classes": args.classes, "device": args.device, "dtype": args.dtype,
                      "torch": torch.__version__, "categories": {c: {"count": e["count"], "mb": round(e["mb"], 3)}
                                                                 for c, e in table.items()},
                      "total": {"count": total["count"], "mb": round(total["mb"], 3)},
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
