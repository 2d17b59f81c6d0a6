"""examples/research-report: fan-out with retries, a rejected draft taking the fallback path."""

from __future__ import annotations

import json

import pytest
from cadenza import FatalError, RetryableError
from cadenza.testing import MemoryContext, run_handler

from ..conftest import EXAMPLES, cadenza
from .helpers import assert_succeeded, load_agents, phases, run_example

EXAMPLE = "research-report"
agents = load_agents(EXAMPLE)
INPUT = json.loads((EXAMPLES / EXAMPLE / "input.json").read_text())
FORUM = "homeheat-forum-thread"


def documents(sources: list[str]) -> list[dict[str, object]]:
    corpus = agents.corpus()
    return [{"id": s, **corpus[s]} for s in sources]


# --------------------------------------------------------------------------- end to end


def test_validate() -> None:
    result = cadenza("validate", f"examples/{EXAMPLE}")
    assert result.returncode == 0, result.stderr


def test_readme_command_retries_sources_and_revises_the_rejected_draft() -> None:
    doc = run_example(EXAMPLE)
    assert_succeeded(doc)
    steps = doc["steps"]
    assert phases(doc) == {
        "gather": "Succeeded",
        "analyse": "Succeeded",
        "validate": "Failed",
        "revise": "Succeeded",
        "report": "Succeeded",
    }
    # Six sources; three are rate-limited (1, 2 and 1 failed attempts): 4 retries in all.
    assert steps["gather"]["items"] == {"total": 6, "Succeeded": 6, "retries": 4}
    out = doc["outputs"]
    assert out["sources"] == 6
    assert out["fetchAttempts"] == [2, 1, 3, 1, 1, 2]  # in the order of input.sources
    # The reviewer rejected the draft; the fallback step revised it and the run went on.
    assert steps["validate"]["error"]["type"] == "FatalError"
    assert [i["code"] for i in steps["validate"]["error"]["details"]["issues"]] == ["low_credibility"] * 3
    assert steps["validate"]["recoveredBy"] == "revise"
    assert steps["validate"]["attempts"] == 1  # a FatalError is not retried
    assert out["revised"] is True and out["rejection"].startswith("draft rejected: F13 rests on HomeHeat")
    assert out["revisions"] == ["moved 3 low-credibility claim(s) to the caveats: F13, F14, F15"]
    report = out["report"]
    assert report.startswith("# Cold-climate air-source heat pumps\n")
    assert "## Caveats" in report and report.count("Anecdotal, unverified") == 3
    sources_section = report.split("## Sources")[1]
    assert "HomeHeat" not in sources_section and "5. The Daily Ledger (2025)" in sources_section
    assert out["sourcesCited"] == 5 and out["findings"] == 15


def test_a_draft_that_passes_review_skips_the_revision() -> None:
    clean = {**INPUT, "sources": [s for s in INPUT["sources"] if s != FORUM]}
    doc = run_example(EXAMPLE, "--input", json.dumps(clean), input_file=False)
    assert_succeeded(doc)
    assert phases(doc)["validate"] == "Succeeded"
    assert phases(doc)["revise"] == "Skipped"  # a fallback runs only when its step fails
    assert doc["outputs"]["revised"] is False and doc["outputs"]["revisions"] == []
    assert "## Caveats" not in doc["outputs"]["report"]


def test_a_revision_that_cannot_fix_the_draft_fails_the_run() -> None:
    tight = {**INPUT, "max_words": 100}
    doc = run_example(EXAMPLE, "--input", json.dumps(tight), input_file=False)
    assert doc["_exit"] == 1 and doc["phase"] == "Failed"
    assert phases(doc)["validate"] == "Failed" and phases(doc)["revise"] == "Failed"
    assert phases(doc)["report"] == "Skipped"
    assert "revision still breaks the rules" in doc["steps"]["revise"]["message"]
    assert doc["message"].startswith("step validate failed")


# ---------------------------------------------------------------------------- the agents


def test_rate_limited_source_fails_its_first_attempts() -> None:
    with pytest.raises(RetryableError, match="429"):
        run_handler(agents.fetcher, {"source": "lakeshore-rebate-data"}, attempt=1)
    with pytest.raises(RetryableError):
        run_handler(agents.fetcher, {"source": "lakeshore-rebate-data"}, attempt=2)
    doc = run_handler(agents.fetcher, {"source": "lakeshore-rebate-data"}, attempt=3)
    assert doc["fetched_on_attempt"] == 3 and doc["credibility"] == "high"
    assert run_handler(agents.fetcher, {"source": FORUM})["fetched_on_attempt"] == 1
    with pytest.raises(FatalError, match="unknown source"):
        run_handler(agents.fetcher, {"source": "nope"})


def test_findings_are_grouped_by_theme() -> None:
    draft = agents.build_draft(INPUT, documents(INPUT["sources"]))
    themes = {f["id"]: f["theme"] for f in draft["findings"]}
    assert len(themes) == 18  # three per source
    assert set(themes.values()) == {"performance", "running_cost", "adoption", "grid"}
    first = draft["findings"][0]
    assert (
        first["source"] == "nel-field-trial-2024" and "2.1 at outdoor temperatures of -15" in first["claim"]
    )
    assert len(draft["summary"]) == 4  # one sentence per theme


def test_reviewer_and_editor() -> None:
    ctx = MemoryContext()
    assert (
        run_handler(agents.analyst, {**INPUT, "documents": documents(INPUT["sources"])}, context=ctx)[
            "findings"
        ]
        == 18
    )
    with pytest.raises(FatalError) as rejected:
        run_handler(agents.reviewer, {"max_words": 450}, context=ctx)
    issues = rejected.value.details["issues"]
    assert {i["finding"] for i in issues} == {"F13", "F14", "F15"}
    rejection = {"type": "FatalError", "message": str(rejected.value), "details": {"issues": issues}}
    revised = run_handler(agents.editor, {"rejection": rejection, "max_words": 450}, context=ctx)
    assert revised["findings"] == 15
    assert run_handler(agents.reviewer, {"max_words": 450}, context=ctx)["approved"] is True
    report = run_handler(agents.writer, {}, context=ctx)
    assert report["revised"] is True and report["caveats"] == 3


def test_editor_cuts_for_length_but_keeps_every_theme() -> None:
    draft = agents.build_draft(INPUT, documents([s for s in INPUT["sources"] if s != FORUM]))
    issues = agents.review(draft, 300)
    assert [i["code"] for i in issues] == ["too_long"]
    revised = agents.revise(draft, issues, 300)
    assert agents.body_words(revised) <= 300
    assert {f["theme"] for f in revised["findings"]} == {"performance", "running_cost", "adoption", "grid"}
    assert all(c.startswith("cut F") for c in revised["revisions"])
    with pytest.raises(FatalError, match="still breaks"):
        agents.revise(draft, issues, 100)
