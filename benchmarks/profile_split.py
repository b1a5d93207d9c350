"""The profile split of a result file whose ``profile`` is a plain list of operators (files written before
``bench.profile`` reported ``split``, e.g. a run at an older commit): matrix products + attention against
everything else, by ``setr.benchmark.profile.split_of``, with the step time from the file's setting. Prints one
JSON line, so ``benchmarks/record.py`` keeps the derived figures beside their source:

    .venv/bin/python benchmarks/record.py cpu_x_split -- .venv/bin/python benchmarks/profile_split.py \\
        benchmarks/results/cpu_x.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from setr.benchmark.profile import split_of


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: profile_split.py RESULT.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        result = json.loads(path.read_text())["result"]
        profile = result["profile"]
        rows = profile["top"] if isinstance(profile, dict) else profile
        steps_per_s = result["measures"]["train_steps_per_s"]["setting"]["median"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {path}: no bench result with a profile and a training rate ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    split = split_of(((r["name"], float(r["self_ms"])) for r in rows), 1e3 / steps_per_s)
    print(json.dumps({"source": path.as_posix(), "operators": len(rows), "split": split}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
