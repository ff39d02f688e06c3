"""The README's error table against the codes the code raises: every coded DistributionError the
code can raise, whether a tool answers it or a job's lastError carries it, is in the table (one was
missing, found by a review of issue 15)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def raised_codes() -> dict[str, str]:
    codes: dict[str, str] = {}
    for package in ("wordclaw_mcp", "queue_worker"):
        for source in sorted((ROOT / package).rglob("*.py")):
            for match in re.finditer(r'DistributionError\(\s*"([A-Z][A-Z_]+)"', source.read_text()):
                codes.setdefault(match.group(1), str(source.relative_to(ROOT)))
    return codes


def test_every_code_the_code_raises_is_in_the_readme_error_table() -> None:
    table = "\n".join(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `"))
    missing = {code: where for code, where in raised_codes().items() if f"`{code}`" not in table}
    assert not missing, f"raised but not in the README's error table: {missing}"
