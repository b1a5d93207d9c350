"""Every measured speed figure in the speed tables of README.md and docs/speed.md names its result file under
``benchmarks/results/`` (written by ``benchmarks/record.py``): the file exists, parses, holds the provenance keys,
and the row's rates and ratios are numbers of that file. Rows marked "not re-measured" are exempt."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", ROOT / "docs" / "speed.md")
RESULTS = ROOT / "benchmarks" / "results"

_spec = importlib.util.spec_from_file_location("benchmarks_record", ROOT / "benchmarks" / "record.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)

# a measured figure: a rate, a time, a memory, a share or a ratio (1.17x); not sizes (512x512), counts or FLOPs
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:img/s|steps/s|samples/s|ms|s|GB|MB|%)(?![\w/])"
                    r"|(?<![\w.])\d+\.\d+x(?!\w)")
# the figures checked against the file's numbers: rates, times in ms and ratios
CHECKED = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)\s?(?:img/s|steps/s|ms)(?![\w/])|(?<![\w.])(\d+\.\d+)x(?!\w)")
FILE = re.compile(r"benchmarks/results/([A-Za-z0-9][A-Za-z0-9_.-]*\.json)")
EXEMPT = re.compile(r"not re-measured", re.IGNORECASE)


def table_rows(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every body row of every Markdown table (header and separator rows left out)."""
    rows, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\s*\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*", lines[i + 1])):
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append((i + 1, lines[i]))
                i += 1
        else:
            i += 1
    return rows


def numbers_in(value) -> list[float]:
    """Every number anywhere in a JSON value."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)] if math.isfinite(value) else []
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers_in(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers_in(v)]
    return []


def file_problem(path: Path) -> str | None:
    """What is wrong with one result file, or None."""
    if not path.is_file():
        return "does not exist"
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        return f"is not JSON ({e})"
    if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
        return "has no 'result' object (the command's JSON line)"
    prov = data.get("provenance")
    if not isinstance(prov, dict):
        return "has no 'provenance' object"
    missing = [k for k in record.PROVENANCE_KEYS if k not in prov]
    if missing:
        return f"provenance lacks {missing}"
    empty = [k for k in ("device_name", "torch", "git_commit", "date_utc", "command") if not prov[k]]
    if empty:
        return f"provenance has no value for {empty}"
    return None


def shown_in(shown: str, values: list[float]) -> bool:
    """Whether ``shown`` (as printed, e.g. '6.44' or '1,234') is one of ``values`` rounded to its decimals (3
    significant digits allowed for values of 100 and more, as the bench's table prints them)."""
    x = float(shown.replace(",", ""))
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    tol = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(v - x) <= tol or (x >= 100 and abs(v - x) <= 0.005 * abs(v)) for v in values)


def row_problems(text: str, where: str, results: Path = RESULTS) -> list[str]:
    """One line per table row of ``text`` that states a measured figure without a good result file, or whose rates
    and ratios are not numbers of the files it names."""
    problems = []
    for line_no, row in table_rows(text):
        if not FIGURE.search(row) or EXEMPT.search(row):
            continue
        names = FILE.findall(row)
        if not names:
            problems.append(f"{where}:{line_no}: a measured figure and no benchmarks/results/<name>.json: {row}")
            continue
        values = []
        for name in names:
            bad = file_problem(results / name)
            if bad:
                problems.append(f"{where}:{line_no}: benchmarks/results/{name} {bad}")
            else:
                values += numbers_in(json.loads((results / name).read_text())["result"])
        if values:
            for m in CHECKED.finditer(FILE.sub("", row)):
                shown = m.group(1) or m.group(2)
                if not shown_in(shown, values):
                    problems.append(f"{where}:{line_no}: {m.group(0)!r} is no number of {names}")
    return problems


# ----------------------------------------------------------------------------------------- the docs
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_measured_row_names_its_result_file(doc):
    assert row_problems(doc.read_text(), doc.relative_to(ROOT).as_posix()) == []


def test_speed_doc_names_result_files():
    """docs/speed.md's tables are backed by files at all (not only exempt rows)."""
    assert FILE.search((ROOT / "docs" / "speed.md").read_text())


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_result_file_has_provenance(path):
    assert file_problem(path) is None


# ------------------------------------------------------------------------- the check itself can fail
def _write(results: Path, name: str, result: dict, drop: str | None = None) -> None:
    prov = dict.fromkeys(record.PROVENANCE_KEYS, "x")
    prov.pop(drop, None)
    results.mkdir(parents=True, exist_ok=True)
    (results / name).write_text(json.dumps({"provenance": prov, "result": result}))


TABLE = """
| row | train | whole |
|---|---|---|
{row}
"""


def test_row_with_figure_and_no_file_fails(tmp_path):
    md = TABLE.format(row="| ViT-B MLA 256 | 1.06x (0.74 steps/s) | 1.01x |")
    problems = row_problems(md, "x.md", tmp_path)
    assert len(problems) == 1 and "no benchmarks/results" in problems[0]


def test_row_marked_not_remeasured_is_exempt(tmp_path):
    md = TABLE.format(row="| ViT-B MLA 256 | 1.06x | 1.01x | not re-measured (no result file) |")
    assert row_problems(md, "x.md", tmp_path) == []


def test_row_without_figure_needs_no_file(tmp_path):
    md = TABLE.format(row="| MLA | 310.2 M, 756 GFLOPs | 512x512, batch 8 x 128 |")
    assert row_problems(md, "x.md", tmp_path) == []


def test_missing_and_incomplete_files_fail(tmp_path):
    row = "| a | 1.06x | [json](../benchmarks/results/{}) |"
    assert "does not exist" in row_problems(TABLE.format(row=row.format("gone.json")), "x.md", tmp_path)[0]
    _write(tmp_path, "noload.json", {"ratio": 1.06}, drop="loadavg_start")
    assert "loadavg_start" in row_problems(TABLE.format(row=row.format("noload.json")), "x.md", tmp_path)[0]
    (tmp_path / "broken.json").write_text("{")
    assert "not JSON" in row_problems(TABLE.format(row=row.format("broken.json")), "x.md", tmp_path)[0]


def test_figure_not_in_the_file_fails(tmp_path):
    _write(tmp_path, "r.json", {"measures": {"train_steps_per_s": {"ratio": 1.0612, "setting": {"median": 0.7391}}}})
    ok = TABLE.format(row="| a | 1.06x (0.74 steps/s) | [json](../benchmarks/results/r.json) |")
    assert row_problems(ok, "x.md", tmp_path) == []
    bad = TABLE.format(row="| a | 1.16x (0.74 steps/s) | [json](../benchmarks/results/r.json) |")
    problems = row_problems(bad, "x.md", tmp_path)
    assert len(problems) == 1 and "'1.16x'" in problems[0]


# ------------------------------------------------------------------------------------- the recorder
def test_recorder_writes_result_with_provenance(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "record.py"), "probe", "--results", str(tmp_path), "--note",
           "n", "--", sys.executable, "-c", "print('table'); print('{\"measures\": {\"r\": 1.5}}')"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "table" in out.stdout  # the command's output passes through
    data = json.loads((tmp_path / "probe.json").read_text())
    assert data["result"] == {"measures": {"r": 1.5}} and data["note"] == "n"
    assert file_problem(tmp_path / "probe.json") is None
    prov = data["provenance"]
    assert prov["command"].startswith(sys.executable) and len(prov["loadavg_end"]) == 3


def test_recorder_writes_nothing_when_the_command_fails_or_prints_no_json(tmp_path):
    rec = [sys.executable, str(ROOT / "benchmarks" / "record.py")]
    fail = subprocess.run([*rec, "f", "--results", str(tmp_path), "--", sys.executable, "-c", "raise SystemExit(3)"],
                          capture_output=True, text=True, timeout=120)
    assert fail.returncode == 3 and "status 3" in fail.stderr
    silent = subprocess.run([*rec, "s", "--results", str(tmp_path), "--", sys.executable, "-c", "print('x')"],
                            capture_output=True, text=True, timeout=120)
    assert silent.returncode == 1 and "no JSON object line" in silent.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_profile_split_of_an_older_result_file(tmp_path, capsys):
    """benchmarks/profile_split.py derives the split of a file whose profile is a plain operator list."""
    spec = importlib.util.spec_from_file_location("benchmarks_profile_split",
                                                  ROOT / "benchmarks" / "profile_split.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [{"name": "aten::mm", "self_ms": 30.0}, {"name": "aten::_log_softmax", "self_ms": 6.0},
            {"name": "aten::mm", "self_ms": 4.0}, {"name": "aten::copy_", "self_ms": 4.0}]
    src = tmp_path / "old.json"
    src.write_text(json.dumps({"result": {"profile": rows,
                                          "measures": {"train_steps_per_s": {"setting": {"median": 20.0}}}}}))
    assert mod.main([str(src)]) == 0
    split = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["split"]
    assert split == {"matmul_ms": 34.0, "other_ms": 10.0, "profiled_ms": 44.0, "step_ms": 50.0,
                     "outside_share": 10.0 / 44.0}
    src.write_text(json.dumps({"result": {}}))
    assert mod.main([str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src}: no bench result with a profile")
