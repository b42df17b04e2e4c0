"""The results files stay small and add up: findings grouped with counts (at most
_harness.EXAMPLES examples per kind and outcome), report.py reading both layouts, measure.py
--join summing only campaigns measured in parts."""
import sys
from pathlib import Path

from . import _harness as h

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402
import report  # noqa: E402


def _tally(n_messages: int, repeats: int) -> h.Tally:
    t = h.Tally()
    for i in range(n_messages):
        for _ in range(repeats):
            t.add(h.Result(h.Case("x", "kind-a", "invalid"), "traceback", f"message {i} in /tmp/abc{i}/f.toml"))
    t.add(h.Result(h.Case("x", "kind-a", "valid"), "success", ""))
    return t


def test_findings_are_grouped_and_bounded_but_every_one_is_counted():
    rec = _tally(20, 3).to_json()
    assert rec["cases"] == 61 and rec["outcomes"] == {"traceback": 60, "success": 1}
    assert len(rec["findings"]) == h.EXAMPLES + 1                       # five examples and the rest
    assert sum(f["count"] for f in rec["findings"]) == 60
    assert rec["findings"][-1]["detail"] == "(other findings of this kind)"
    assert {f["count"] for f in rec["findings"][:-1]} == {3}
    text = report.findings({"campaigns": {"c": rec}}, "c")
    assert "3 x [traceback] kind-a" in text and "45 x [traceback] kind-a" in text


def test_an_old_file_compacts_to_the_same_report():
    old = {"label": "before", "seed": 0, "date": "d", "machine": "m", "command": "c", "campaigns": {"c": {
        "cases": 4, "outcomes": {"traceback": 4}, "by_kind": {"k": {"traceback": 4}},
        "findings": [{"kind": "k", "outcome": "traceback", "detail": "same"}] * 4}}}
    before = report.findings(old, "c")
    new = measure.compact(old)
    assert new["campaigns"]["c"]["findings"] == [{"kind": "k", "outcome": "traceback", "count": 4, "detail": "same"}]
    assert report.findings(new, "c") == before == "- 4 x [traceback] k: `same`"


def test_join_sums_parts_and_replaces_full_measurements():
    def file(command, cases, outcome):
        return {"label": "after", "seed": 0, "date": "d", "machine": "m", "command": command, "campaigns": {"faults": {
            "cases": cases, "outcomes": {outcome: cases}, "by_kind": {"k": {outcome: cases}}, "findings": [],
            "command": command, "date": "d", "machine": "m"}}}
    parts = measure.join([file("measure.py --fault-parts sigkill", 24, "success"),
                          file("measure.py --fault-parts concurrent", 9, "clean error")])
    c = parts["campaigns"]["faults"]
    assert c["cases"] == 33 and c["outcomes"] == {"success": 24, "clean error": 9}
    assert c["by_kind"]["k"] == {"success": 24, "clean error": 9} and "concurrent" in c["command"]
    full = measure.join([file("measure.py", 5, "traceback"), file("measure.py", 7, "success")])
    assert full["campaigns"]["faults"]["cases"] == 7 and full["campaigns"]["faults"]["outcomes"] == {"success": 7}
