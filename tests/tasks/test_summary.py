"""src/summary.py: the parameter / GFLOPs table and its last JSON line; FLOP counting checked by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import tiny_model_cfg
from pipeline import ROOT
from setr.models import build_setr
from setr.models.summary import count_flops, count_params, summarize_model


def _summary(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "src" / "summary.py"), *overrides], cwd=ROOT, text=True,
                          capture_output=True, timeout=1200, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_summary_entry_point_full_size_mla():
    proc = _summary("model=setr_mla", "data=ade20k")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) == {"total", "encoder", "decode_head", "auxiliary_heads", "gflops"}
    assert last["total"] == 310_184_086 == last["encoder"] + last["decode_head"] + last["auxiliary_heads"]
    assert last["auxiliary_heads"] == 4 * 256 * 150  # four 1x1 linear heads on the 256-channel neck, no bias
    assert 700 < last["gflops"] < 800  # 756.4 measured at 512x512
    table = proc.stdout
    assert "neck (MLA" in table and "3,420,160" in table and "vit_large_patch16: 24 blocks, dim 1024" in table


@pytest.mark.slow
def test_summary_without_flops_and_bad_values():
    proc = _summary("model=setr_naive", "data=cityscapes", "summary.flops=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    # Cityscapes: 768x768 crops (48x48 position embeddings instead of 32x32), 19 classes
    assert last == {"total": 306_537_548, "encoder": 304_147_456 + (48 * 48 - 32 * 32) * 1024,
                    "decode_head": 269_843, "auxiliary_heads": 809_529, "gflops": None}
    bad = _summary("summary.input_size=[0,512]")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")] == [
        "error: summary.input_size: sizes must be positive, got [0, 512]"]
    unknown = _summary("model=setr_huge")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "Could not find 'model/setr_huge'" in unknown.stderr and "setr_mla" in unknown.stderr


def test_flops_of_a_head_counted_by_hand():
    """A 1x1 conv of Cin->Cout on an HxW map is 2*Cin*Cout*H*W FLOPs: check the per-part split on a tiny model."""
    torch.manual_seed(0)
    model = build_setr(tiny_model_cfg("naive", 64, 5))
    flops = count_flops(model, (64, 64), training=False)
    # naive head on the 64-dim test encoder: 1x1 conv 64->256 and classifier 256->5 on the 4x4 token grid
    assert flops["decode_head"] == 2 * 16 * (64 * 256 + 256 * 5)
    assert flops["auxiliary_heads"] == 0  # auxiliary heads do not run in eval
    assert flops["total"] == flops["encoder"] + flops["decode_head"]
    train = count_flops(model, (64, 64), training=True)
    assert train["auxiliary_heads"] == 3 * flops["decode_head"]  # three auxiliary heads, same structure
    # patch embedding alone: a 16x16 stride-16 conv 3->64 on 4x4 positions
    patch = 2 * 16 * (3 * 16 * 16 * 64)
    assert flops["encoder"] > patch


def test_summary_parts_add_up_and_count_shared_parameters_once():
    model = build_setr(tiny_model_cfg("mla", 64, 5))
    s = summarize_model(model, (64, 64))
    j = s["json"]
    assert j["total"] == sum(p.numel() for p in model.parameters())
    assert j["encoder"] == count_params(model.encoder)[0] + count_params(model.neck)[0]
    assert j["total"] == j["encoder"] + j["decode_head"] + j["auxiliary_heads"]
    shared = nn.Linear(4, 4)
    assert count_params(nn.Sequential(shared, shared)) == (20, 20)
    # the frozen class token of SETR-MLA is a parameter but not a trainable one
    total, trainable = s["total"]
    assert total - trainable == model.encoder.embed_dim
