"""src/bench.py: the setting-vs-baseline speed table and its JSON line (shapes and keys only, never a speed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline import ROOT
from setr.benchmark.data import workers_per_gpu
from setr.benchmark.inference import inference_configs, windows_per_forward
from setr.benchmark.mfu import mfu, peak_tflops
from setr.benchmark.profile import is_matmul, profile_train
from setr.benchmark.timing import MEASURES, measures_of, timed
from setr.benchmark.variant import Variant, precision_of
from setr.errors import SETRConfigError
from setr.tasks.bench import HEADERS, skipped

TINY = ["model/encoder=vit_test", "data.crop_size=64", "data.batch_size=2", "bench.image_size=64",
        "bench.rounds=1", "bench.warmup=1", "bench.steps_per_round=1", "bench.data_images=2",
        "data.ms_ratios=[0.5,1.0]", "bench.device=cpu"]


def _bench(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), *overrides], cwd=ROOT, text=True,
                          capture_output=True, timeout=1800, stdin=subprocess.DEVNULL)


def test_bench_entry_point_tiny():
    proc = _bench(*TINY, "model.encoder.grad_checkpointing=2", "+data.inference.batch_size=auto",
                  "model.channels_last=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for header in HEADERS:
        assert header in proc.stdout
    for _, label, _ in MEASURES:
        assert label in proc.stdout
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"device", "gpu", "torch", "batch_size", "crop_size", "image_size", "rounds", "warmup", "steps_per_round",
            "setting", "baseline", "train_gflops_per_step", "data_pipeline", "measures"} <= set(last)
    assert last["device"] == "cpu" and last["gpu"] is None and last["train_gflops_per_step"] is None
    assert last["batch_size"] == 2 and last["crop_size"] == [64, 64] and last["image_size"] == [64, 64]
    assert last["setting"]["grad_checkpointing"] == 2 and last["setting"]["fused_attn"] is True
    assert last["setting"]["slide_batch_size"] == "auto" and last["setting"]["slide_windows_per_forward"] >= 1
    assert last["baseline"] == {"precision": "32-true", "fused_attn": False, "grad_checkpointing": False,
                                "compile": False, "resize": "interpolate", "channels_last": False,
                                "slide_batch_size": 1, "slide_windows_per_forward": 1, "peak_tflops": None}
    assert last["setting"]["resize"] == "matmul" and last["setting"]["channels_last"] is True
    measures = last["measures"]
    assert set(measures) == {name for name, _, _ in MEASURES}
    for name, m in measures.items():
        assert set(m) == {"setting", "baseline", "ratio"}
        assert set(m["setting"]) == set(m["baseline"]) == {"min", "median"}
        if name == "mfu" or (last["data_pipeline"] is None and name.startswith(("data_", "workers_"))):
            assert m["ratio"] is None  # CPU: no MFU
        else:
            assert m["setting"]["min"] > 0 and m["baseline"]["median"] > 0 and m["ratio"] > 0, name


def test_bench_bad_values_are_one_line():
    bad = _bench("bench.rounds=0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")] == [
        "error: bench.rounds: expected an integer >= 1, got 0"]
    unknown = _bench("bench.skip=foo")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "error: bench.skip: unknown measure(s) ['foo']; choose from ['data', 'ms_flip', 'slide', 'whole']" \
        in unknown.stderr
    prec = _bench("trainer.precision=64-true")
    assert prec.returncode == 2 and "error: trainer.precision:" in prec.stderr


def test_ratio_direction_and_peaks():
    m = measures_of({"train_steps_per_s": [2.0, 4.0, 3.0], "train_peak_mem_mb": [50.0]},
                    {"train_steps_per_s": [1.0, 1.5], "train_peak_mem_mb": [100.0]})
    assert m["train_steps_per_s"]["setting"] == {"min": 2.0, "median": 3.0}
    assert m["train_steps_per_s"]["ratio"] == pytest.approx(3.0 / 1.25)  # > 1: the setting is faster
    assert m["train_peak_mem_mb"]["ratio"] == pytest.approx(2.0)  # > 1: the setting needs less
    assert m["mfu"] == {"setting": {"min": None, "median": None}, "baseline": {"min": None, "median": None},
                        "ratio": None}
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16-mixed") == 756.0
    assert peak_tflops("Some GPU", "bf16-mixed") is None and peak_tflops(None, "32-true") is None
    assert peak_tflops("Some GPU", "bf16-mixed", override=100) == 100.0
    assert mfu(2e12, [10.0, 20.0], peak=100.0) == [0.2, 0.4]  # FLOPs/image x images/s over the peak


def test_config_checks_and_workers():
    assert skipped("data") == {"data"} and skipped(["whole", "ms_flip"]) == {"whole", "ms_flip"}
    assert skipped(None) == set()
    assert precision_of("bf16") == "bf16-mixed" and precision_of(32) == "32-true"
    with pytest.raises(SETRConfigError, match=r"^trainer\.precision:"):
        precision_of("64-true")
    assert workers_per_gpu([100.0, 250.0], per_worker=100.0) == [1.0, 3.0]  # rounded up
    assert workers_per_gpu([100.0], per_worker=0.0) == []  # no figure rather than an infinite one
    calls = []
    assert timed(lambda: calls.append(1), 3, torch.device("cpu")) >= 0 and len(calls) == 3


def _variant(data: dict, slide_batch_size: int | str = 1) -> Variant:
    return Variant(name="x", precision="32-true", model_cfg={}, fused_attn=None, grad_checkpointing=False,
                   compile=False, data=data, optimizer={}, slide_batch_size=slide_batch_size)


def test_inference_configs_follow_the_data_config():
    cpu = torch.device("cpu")
    v = _variant({"crop_size": 64, "ms_ratios": [0.5, 1.0], "test_scale": [2048, 512], "ms_min_short": 32,
                  "inference": {"mode": "slide"}}, slide_batch_size=4)
    cfgs = inference_configs(v, (512, 1024), cpu)
    assert cfgs["whole"] == {"mode": "whole"} and v.windows == 4
    assert cfgs["slide"] == {"mode": "slide", "crop_size": [64, 64], "stride": [42, 42], "batch_size": 4}
    assert cfgs["ms_flip"] == {**cfgs["slide"], "scales": [0.5, 1.0], "flip": True, "average": "probs",
                               "img_scale": [2048, 512], "min_short": 32}  # the data config's mode: slide
    whole = inference_configs(_variant({"crop_size": [32, 48]}), (64, 64), cpu)
    assert whole["slide"]["stride"] == [21, 32] and whole["ms_flip"] == {
        "mode": "whole", "scales": [1.0], "flip": True, "average": "probs", "img_scale": None}
    with pytest.raises(SETRConfigError, match=r"^data\.inference\.stride:"):
        windows_per_forward(_variant({}, "auto"), (64, 64), (32, 32), [0, 8], cpu)


def test_profile_rows():
    a = torch.randn(64, 64)
    profiled = profile_train(lambda: (a @ a).relu_(), steps=2, device=torch.device("cpu"), rows=2, step_ms=1.0)
    rows, split = profiled["top"], profiled["split"]
    assert 1 <= len(rows) <= 2 and all(set(r) == {"name", "self_ms", "share", "calls"} for r in rows)
    assert {r["name"] for r in rows} <= {"aten::mm", "aten::matmul", "aten::relu_", "aten::clamp_min_"}
    assert all(r["calls"] == 1 and r["self_ms"] > 0 for r in rows)
    assert split["matmul_ms"] > 0 and split["other_ms"] > 0 and split["step_ms"] == 1.0
    assert split["outside_share"] == pytest.approx(split["other_ms"] / (split["matmul_ms"] + split["other_ms"]))


@pytest.mark.parametrize("name, matmul", [
    ("aten::mm", True), ("aten::addmm", True), ("aten::convolution_backward", True),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", True), ("aten::_flash_attention_backward", True),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", True), ("nvjet_tst_128x256_64x4_2x1_v", True),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)", True),
    ("aten::copy_", False), ("aten::_to_copy", False), ("aten::native_layer_norm", False),
    ("aten::_log_softmax", False), ("aten::upsample_bilinear2d", False), ("aten::add_", False),
    ("void at::native::elementwise_kernel<128, 4>(...)", False), ("aten::matmul", False),
])
def test_profile_split_names(name, matmul):
    """aten::matmul is a dispatcher (its self time is not the product: that is aten::mm's); copies, norms,
    softmax, resizing and elementwise kernels are outside."""
    assert is_matmul(name) is matmul
