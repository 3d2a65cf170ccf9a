"""Record the golden CLI outputs into tests/golden/ (compared by tests/test_golden.py).

Usage: .venv/bin/python scripts/record_golden.py [CASE...]   (default: every case this machine can run)

Run it only when an output is meant to change; the cases and their normalization are in tests/golden_cli.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from golden_cli import CASES, GOLDEN, golden_path, missing, output


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        print(
            f"record_golden: unknown case {', '.join(unknown)} (known: {', '.join(c.name for c in CASES)})",
            file=sys.stderr,
        )
        return 1
    GOLDEN.mkdir(exist_ok=True)
    for case in CASES:
        if names and case.name not in names:
            continue
        reason = missing(case)
        if reason:
            print(f"{case.name}: skipped ({reason})")
            continue
        with tempfile.TemporaryDirectory(prefix="klaus-golden-") as folder:
            text = output(case, Path(folder))
        golden_path(case).write_text(text, encoding="utf-8")
        print(f"{golden_path(case)}: {len(text.encode('utf-8'))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
