"""The `klaus` commands give the same bytes as when tests/golden/ was recorded (timings aside).

Re-record (only for an intended change of output, and say why in the commit):
``.venv/bin/python scripts/record_golden.py``. See tests/golden_cli.py for what each case runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from golden_cli import CASES, Case, golden_path, missing, output


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_output(case: Case, tmp_path: Path) -> None:
    reason = missing(case)
    if reason:
        pytest.skip(reason)
    recorded = golden_path(case)
    assert recorded.is_file(), f"{recorded} missing: run scripts/record_golden.py"
    assert output(case, tmp_path) == recorded.read_text(encoding="utf-8")
