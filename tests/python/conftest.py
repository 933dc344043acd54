"""Every skipped test is appended to ``$SCFM_SKIP_LOG`` (when set) as ``pytest:<id><TAB>reason``,
so that ``scripts/test.sh`` counts and prints the skips of the Rust and Python tests
together and fails when a check that must run here (``$SCFM_MUST_RUN``) skipped. A skip
whose reason starts with ``n/a:`` is a parametrised case the check does not apply to (not a
check that could not run here) and is not logged."""

from __future__ import annotations

import os


def pytest_runtest_logreport(report):
    log = os.environ.get("SCFM_SKIP_LOG")
    if not log or not report.skipped:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = str(reason).removeprefix("Skipped: ").replace("\n", " ").replace("\t", " ")
    if reason.startswith("n/a:"):
        return
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"pytest:{report.nodeid}\t{reason}\n")
