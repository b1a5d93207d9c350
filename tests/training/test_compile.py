"""model.compile=true: the compiled part of a training step is one graph, with no graph break.

:class:`setr.training.SETRModule` compiles the network (``torch.compile(self.model)``); the loss
(:meth:`SETRModule.compute_loss`, both ``model.loss_path`` values) runs outside it. A graph break splits the
compiled network into pieces with eager Python between them (lost fusion, a host round trip per break), silently:
these tests count them with dynamo's counters (``torch._dynamo.utils.counters["graph_break"]``).

Graph breaks are decided by dynamo, the Python-bytecode tracer in front of every backend: the graphs it hands to
inductor are the graphs it hands to the ``eager`` backend. So these tests compile with ``backend="eager"`` (no
code generation, no C++ compiler: seconds on a CPU); ``tests/tasks/test_train.py::
test_compile_really_compiles_and_trains_a_step`` (slow) runs the default inductor backend end to end.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import tiny_model_cfg
from setr.checkpoint import ModelRecord
from setr.models import resize
from setr.models.seg_loss import upsampled_cross_entropy
from setr.training import SETRModule

CLASSES, CROP = 5, 64
# narrow heads (16 channels instead of 256 / 128): the same modules and graph, a step in a fraction of the time
NARROW = {"naive": ("model.head.decode.channels=16", "model.head.auxiliary.channels=16"),
          "pup": ("model.head.decode.channels=16", "model.head.auxiliary.channels=16"),
          "mla": ("model.head.neck.channels=16", "model.head.decode.channels=16")}
BACKEND = "eager"  # dynamo only: where the graphs break does not depend on the backend (module docstring)
COMPILE = torch.compile  # the real one (the fixture below patches torch.compile)


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Empty dynamo caches, counters and the resize matrices' cache (as in a fresh process) before and after each
    test; ``torch.compile`` (as SETRModule calls it) compiles with :data:`BACKEND`."""
    def compile_eager(model=None, **kw):
        return COMPILE(model, **{**kw, "backend": BACKEND})

    monkeypatch.setattr(torch, "compile", compile_eager)
    monkeypatch.setattr(resize, "_CACHE", {})
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _module(head: str, loss_path: str, compile: bool = True) -> SETRModule:
    torch.manual_seed(0)
    model = {**tiny_model_cfg(head, CROP, CLASSES, *NARROW[head]), "loss_path": loss_path, "compile": compile}
    record = ModelRecord(model=model, class_names=[str(i) for i in range(CLASSES)], palette=[], crop_size=CROP)
    return SETRModule(record=record).train()


def _batch(size: tuple[int, int] = (CROP, CROP)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, *size, generator=gen), torch.randint(0, CLASSES, (2, *size), generator=gen)


def _step(module: SETRModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What :meth:`SETRModule.training_step` computes (its logging needs a trainer): forward, loss, backward."""
    loss, _ = module.compute_loss(module(x), y)
    loss.backward()
    return loss.detach()


def _graph_breaks() -> dict[str, int]:
    return dict(counters["graph_break"])


# the three heads (each with its auxiliary heads) on the default fused loss path, one on an input that the network
# pads (60 x 52 -> 64 x 64, cropped back); the reference path runs the network's other branch (logits resized to the
# input inside the network), here under bf16 autocast (trainer.precision=bf16-mixed, on the CPU's autocast)
CASES = [("naive", "fused", (60, 52), None), ("pup", "fused", (64, 64), None), ("mla", "fused", (64, 64), None),
         ("naive", "reference", (64, 64), torch.bfloat16)]
IDS = [f"{h}-{p}-{s[0]}x{s[1]}" + ("-bf16" if a else "") for h, p, s, a in CASES]


@pytest.mark.parametrize(("head", "loss_path", "size", "amp"), CASES, ids=IDS)
def test_compiled_training_step_has_no_graph_break(head, loss_path, size, amp):
    """Two compiled training steps (forward, loss, backward): the network traces as one graph with no graph break,
    the second step reuses it (no recompile), and the loss and gradients are the eager step's."""
    compiled, eager = _module(head, loss_path), _module(head, loss_path, compile=False)
    assert compiled.hparams.compile and compiled._forward is not compiled.model
    x, y = _batch(size)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        loss = _step(compiled, x, y)
        assert _graph_breaks() == {}, _graph_breaks()
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert counters["stats"]["calls_captured"] > 100  # the whole network is in the graph
        grads = {n: p.grad.clone() for n, p in compiled.model.named_parameters() if p.grad is not None}
        _step(compiled, x, y)
        assert _graph_breaks() == {} and counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        torch.testing.assert_close(loss, _step(eager, x, y))
    want = {n: p.grad for n, p in eager.model.named_parameters() if p.grad is not None}
    assert grads.keys() == want.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want[name], msg=name)


def test_an_eager_forward_between_compiled_steps_does_not_recompile(monkeypatch):
    """The compiled graph does not depend on what eager code did in between (here: the uncompiled network of the
    same config, which resizes the logits to the input on the reference loss path)."""
    compiled, eager = _module("naive", "reference"), _module("naive", "reference", compile=False)
    x, y = _batch()
    _step(compiled, x, y)
    _step(eager, x, y)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    _step(compiled, x, y)


def test_the_check_sees_a_graph_break():
    """A host read in a head's forward (``.item()``, as a debug print of a value would make) is a graph break, and
    the counters the tests above read report it: they can fail."""
    module = _module("naive", "fused")
    module.model.decode_head.register_forward_hook(lambda mod, args, out: out.sum().item() and None)
    _step(module, *_batch())
    assert sum(_graph_breaks().values()) >= 1
    assert counters["stats"]["unique_graphs"] >= 2


@pytest.mark.parametrize("loss_path", ["reference", "fused"])
def test_loss_traces_as_one_graph_forward_and_backward(loss_path):
    """The loss alone under ``fullgraph=True`` (a graph break raises) with the ``aot_eager`` backend, which traces
    the backward too: what compiling the network and the loss as one function needs (SETRModule compiles the
    network only today). The fused path's band rows are plain arithmetic on the sizes, never read from a tensor."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, CLASSES, 4, 4, generator=gen, requires_grad=True)
    y = torch.randint(0, CLASSES, (2, 61, 47), generator=gen)

    def loss(logits, target):
        if loss_path == "fused":
            return upsampled_cross_entropy(logits, target, (64, 48))
        up = torch.nn.functional.interpolate(logits, size=(64, 48), mode="bilinear")[..., :61, :47]
        return torch.nn.functional.cross_entropy(up, target)

    got = COMPILE(loss, backend="aot_eager", fullgraph=True)(x, y)
    (g,) = torch.autograd.grad(got, x)
    want = loss(x, y)
    (g_want,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, g_want)
