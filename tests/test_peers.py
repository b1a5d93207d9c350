"""benchmarks/peers.py: mmsegmentation 1.2.2 installed offline from the shipped wheels (benchmarks/peers/install.py),
its SETR configs built, converted, checked equal to this project's network, and bad arguments refused in one line.
The speed figures themselves are not tested (no test depends on wall-clock time)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline import ROOT

PEERS = ROOT / "benchmarks" / "peers.py"
INSTALL = ROOT / "benchmarks" / "peers" / "install.py"
TINY = ["--encoder", "vit_t", "--crop", "32", "--batch", "1", "--steps", "1", "--rounds", "1", "--warmup", "0",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """benchmarks/peers.py as a module, with mmseg installed from benchmarks/peers/wheels into a fresh folder."""
    site = tmp_path_factory.mktemp("peers") / "site"
    out = subprocess.run([sys.executable, str(INSTALL), "--site", str(site)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "mmsegmentation 1.2.2" in out.stdout
    old = os.environ.get("SETR_PEERS_SITE")
    os.environ["SETR_PEERS_SITE"] = str(site)
    try:
        spec = importlib.util.spec_from_file_location("setr_bench_peers", PEERS)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if old is None:
            os.environ.pop("SETR_PEERS_SITE")
        else:
            os.environ["SETR_PEERS_SITE"] = old
    assert site == module.SITE
    return module


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["setr_vit-l_mla_8xb2-160k_ade20k-512x512",
                                    "setr_vit-l_pup_8xb2-160k_ade20k-512x512",
                                    "setr_vit-l_naive_8xb2-160k_ade20k-512x512"])
def test_same_network_as_mmseg(peers, config, capsys):
    mla = "mla" in config
    assert peers.main(["--config", config, *TINY, *([] if mla else ["--no-inference"])]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["peer"] == "mmsegmentation 1.2.2" and out["versions"]["mmengine"] == "0.10.7"
    assert out["logits_rel_diff"] < 1e-4
    head = config.split("_")[2]
    assert out["head"] == f"{head}_mmseg"
    assert [r["impl"] for r in out["rows"]] == ["mmseg", "setr"]
    for row in out["rows"]:
        assert row["train_images_per_s"]["median"] > 0
        if mla:
            assert row["whole_images_per_s"]["median"] > 0 and row["slide_images_per_s"]["median"] > 0
    assert set(out["ratio"]) == {"fp32"}
    if mla:
        assert out["out_indices"] == [2, 5, 8, 11]  # the config's (5, 11, 17, 23) of 24 blocks, on 12


def test_amp_on_cpu_is_named_not_measured(peers, capsys):
    assert peers.main([*TINY, "--precisions", "fp32,amp", "--no-inference"]) == 0
    out = last_json(capsys.readouterr().out)
    skipped = [r for r in out["rows"] if r.get("skipped")]
    assert [r["impl"] for r in skipped] == ["mmseg"] and "GPU" in skipped[0]["skipped"]
    assert set(out["ratio"]) == {"fp32"}


def test_different_networks_stop_the_run(peers):
    cfg = peers.mmseg_config("setr_vit-l_mla_8xb2-160k_ade20k-512x512", "vit_t", 32)
    x = torch.randn(1, 3, 32, 32)
    y = torch.randint(0, 150, (1, 32, 32))
    device = torch.device("cpu")
    mm_model, _ = peers.mmseg_sides(cfg, ["fp32"], device, 1, 32, (32, 40), x, y, x)
    ours, _, _ = peers.our_sides(mm_model, cfg, ["fp32"], "bf16-mixed", device, 1, 32, x, y, x)
    assert peers.check_equal(mm_model, ours, x) < 1e-4
    with torch.no_grad():
        ours.module.model.decode_head.cls.bias += 1.0
    with pytest.raises(SystemExit) as e:
        peers.check_equal(mm_model, ours, x)
    assert e.value.code == 2


@pytest.mark.parametrize("args, says", [
    (["--crop", "30"], "--crop 30: must be a multiple of 16"),
    (["--precisions", "fp16"], "--precisions fp16: expected fp32 and/or amp"),
    (["--rounds", "0"], "--rounds: must be >= 1"),
])
def test_bad_arguments_one_line(peers, args, says, capsys):
    with pytest.raises(SystemExit) as e:
        peers.main(["--device", "cpu", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {says}")


def test_without_mmseg_one_line(tmp_path):
    env = {**os.environ, "SETR_PEERS_SITE": str(tmp_path / "none")}
    out = subprocess.run([sys.executable, str(PEERS), "--device", "cpu"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "mmsegmentation 1.2.2 is not installed; run `make peers`" in lines[0], out.stderr


def test_requirements_are_the_shipped_wheels():
    """benchmarks/peers/requirements.txt pins exactly the wheels of benchmarks/peers/wheels (one of each)."""
    folder = ROOT / "benchmarks" / "peers"
    pins = {}
    for line in (folder / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("-", "_")] = version
    wheels = {}
    for w in (folder / "wheels").glob("*.whl"):
        name, version = w.name.split("-")[:2]
        assert name.lower() not in wheels, f"two wheels of {name}"
        wheels[name.lower()] = version
    assert pins == wheels
