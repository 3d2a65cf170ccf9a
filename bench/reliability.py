"""The "Reliability" section at the end of BENCHMARKS.md, written part by part.

bench/fuzz.py writes its "### Fuzzing" part and bench/serve_load.py its "### Serving under
load" part; each replaces only its own part, so either can be re-run alone. The section is
measured by long runs of their own, not by bench/run_all.py, which keeps it as it is.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADING = "## Reliability"
INTRO = """## Reliability

Hostile inputs and heavy load: every model file and image must end in a result or one clear line
(`klaus: error: FILE: problem`, exit status 1) within bounded memory and time, and `klaus serve` must stay
within its memory under many clients. Measured by long runs of their own (the commands are beside each part);
`python bench/run_all.py` keeps this section as it is. The suite runs the same harness at a small scale
(`tests/test_fuzz.py`, `tests/test_serve_load.py`), asserting outcomes only."""
PARTS = ("### Fuzzing", "### Serving under load")


def section(text: str) -> str:
    """The Reliability section of a BENCHMARKS.md text ('' if there is none): from its heading to the end."""
    start = text.find(f"\n{HEADING}\n")
    return text[start + 1 :] if start >= 0 else ""


def write_part(heading: str, body: str, path: Path = BENCHMARKS) -> None:
    """Put ``body`` (which starts with ``heading``) into the Reliability section, replacing that part."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    old = section(text)
    before = text[: len(text) - len(old)] if old else text.rstrip("\n") + "\n\n"
    parts = _parts(old)
    parts[heading] = body.strip()
    ordered = [parts[h] for h in PARTS if h in parts] + [b for h, b in parts.items() if h not in PARTS]
    path.write_text(before + INTRO + "\n\n" + "\n\n".join(ordered) + "\n", encoding="utf-8")


def _parts(section_text: str) -> dict[str, str]:
    """The "### " parts of a Reliability section, by heading."""
    parts: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in section_text.splitlines():
        if line.startswith("### "):
            if current:
                parts[current] = "\n".join(lines).strip()
            current, lines = line.strip(), [line]
        elif current:
            lines.append(line)
    if current:
        parts[current] = "\n".join(lines).strip()
    return parts
