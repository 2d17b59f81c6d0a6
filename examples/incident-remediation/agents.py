"""Agents of the incident-remediation example: `python agents.py <agent>`.

diagnostician  correlates the alert with deploys, metrics, logs and dependencies
               (data/telemetry.json) and names a cause with its evidence
remediator     turns the cause into a plan from a runbook (data/runbooks.json)
executor       carries the plan out (simulated: no cluster is touched) and verifies it
auditor        writes the audit record: alert, diagnosis, plan, who approved and when,
               what ran, the outcome (also appended to $AUDIT_LOG when set)
notifier       the workflow's onExit step: tells the incident channel how the run ended
               (posts to $INCIDENT_WEBHOOK_URL when set)

Everything is offline and deterministic unless CADENZA_LLM_BASE_URL is set.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cadenza import Agent, FatalError, RetryableError, Task
from cadenza.llm import chat as llm_chat

DATA = Path(__file__).resolve().parent / "data"
ONSET_RATIO = 0.05  # an error ratio above this is an incident
DEPLOY_WINDOW = dt.timedelta(minutes=30)  # a deploy this long before the onset is a suspect
SATURATED_CPU = 0.85
TARGET_CPU = 0.6
COMMAND_SECONDS = float(os.environ.get("EXECUTOR_COMMAND_SECONDS", "0.3"))  # simulated command duration

diagnostician = Agent("diagnostician")
remediator = Agent("remediator")
executor = Agent("executor")
auditor = Agent("auditor")
notifier = Agent("notifier")


# ------------------------------------------------------------------------ helpers


def load_json(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def zulu(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def append_line(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as log:
        log.write(line + "\n")


def pct(ratio: float) -> str:
    return f"{ratio * 100:.1f}%"


# ----------------------------------------------------------------- diagnostician


def diagnose(alert: dict[str, Any], telemetry: dict[str, Any]) -> dict[str, Any]:
    """Name the likeliest cause of the alert, with the evidence for it."""
    labels = alert.get("labels") or {}
    service = labels.get("service")
    svc = telemetry["services"].get(service)
    if svc is None:
        return {
            "service": service,
            "category": "unknown",
            "confidence": 0.2,
            "evidence": [],
            "root_cause": f"no telemetry for service {service!r}",
            "onset": None,
            "suspect_deploy": None,
        }
    errors = svc["metrics"]["error_ratio"]
    onset_point = next((p for p in errors if p["value"] > ONSET_RATIO), None)
    onset = ts(onset_point["at"]) if onset_point else ts(alert["startsAt"])
    evidence = [
        f"error ratio {pct(errors[0]['value'])} at {errors[0]['at']}, "
        f"{pct(errors[-1]['value'])} at {errors[-1]['at']} (onset {zulu(onset)})"
    ]
    deploys = sorted(svc["deploys"], key=lambda d: d["at"])
    suspect = next(
        (d for d in reversed(deploys) if dt.timedelta(0) <= onset - ts(d["at"]) <= DEPLOY_WINDOW), None
    )
    unhealthy = sorted(name for name, state in svc["dependencies"].items() if state != "healthy")
    cpu = svc["metrics"]["cpu_utilisation"]
    new_errors = []
    if suspect is not None:
        evidence.append(
            f"deploy {suspect['version']} at {suspect['at']} ({suspect['change']}), "
            f"{int((onset - ts(suspect['at'])).total_seconds() // 60)} min before the onset"
        )
        new_errors = [log for log in svc["logs"] if ts(log["first_seen"]) >= ts(suspect["at"])]
        evidence += [
            f"new error since the deploy: {log['signature']} ({log['count']}x)" for log in new_errors
        ]
    evidence.append(
        "dependencies: "
        + (", ".join(f"{n} {svc['dependencies'][n]}" for n in unhealthy) if unhealthy else "all healthy")
    )
    evidence.append(f"CPU utilisation {pct(cpu)}")
    previous = None
    if suspect is not None and not unhealthy:
        index = deploys.index(suspect)
        previous = deploys[index - 1]["version"] if index > 0 else None
        category, confidence = "bad_deploy", 0.9 if new_errors else 0.7
        cause = f"deploy {suspect['version']} of {service} introduced errors"
        if new_errors:
            cause += f": {new_errors[0]['signature']}"
    elif cpu >= SATURATED_CPU:
        category, confidence = "saturation", 0.8
        cause = f"{service} is saturated: CPU {pct(cpu)} with {svc['replicas']['ready']} replicas"
    elif unhealthy:
        category, confidence = "dependency", 0.6
        cause = f"unhealthy dependencies: {', '.join(unhealthy)}"
    else:
        category, confidence = "unknown", 0.3
        cause = "no deploy, saturation or dependency explains the alert"
    return {
        "service": service,
        "category": category,
        "confidence": confidence,
        "root_cause": cause,
        "evidence": evidence,
        "onset": zulu(onset),
        "suspect_deploy": suspect,
        "previous_version": previous,
    }


@diagnostician.handler
def diagnose_alert(task: Task) -> dict[str, Any]:
    alert = task.input.get("alert") or {}
    if not (alert.get("labels") or {}).get("service") or not alert.get("startsAt"):
        raise FatalError("the alert needs labels.service and startsAt")
    result = diagnose(alert, load_json("telemetry.json"))
    narrative = llm_chat(
        "You are an SRE. In at most three sentences, explain the likely root cause from the evidence. "
        "Do not invent facts.",
        json.dumps({"alert": alert.get("annotations"), "evidence": result["evidence"]}),
    )
    if narrative:
        result["narrative"] = narrative
    task.log.info("diagnosed", service=result["service"], category=result["category"])
    return result


# -------------------------------------------------------------------- remediator


def plan_fix(diagnosis: dict[str, Any], telemetry: dict[str, Any]) -> dict[str, Any]:
    runbooks = load_json("runbooks.json")["runbooks"]
    category = diagnosis["category"] if diagnosis["category"] in runbooks else "unknown"
    if category == "bad_deploy" and not diagnosis.get("previous_version"):
        category = "unknown"  # nothing to roll back to
    book = runbooks[category]
    svc = telemetry["services"].get(diagnosis["service"]) or {}
    replicas = (svc.get("replicas") or {}).get("ready", 0)
    cpu = (svc.get("metrics") or {}).get("cpu_utilisation", 0.0)
    values = {
        "deployment": svc.get("deployment", f"deployment/{diagnosis['service']}"),
        "namespace": svc.get("namespace", "default"),
        "owner": svc.get("owner", "the service owner"),
        "bad_version": (diagnosis.get("suspect_deploy") or {}).get("version"),
        "good_version": diagnosis.get("previous_version"),
        "replicas": replicas,
        "target_replicas": max(replicas + 1, math.ceil(replicas * cpu / TARGET_CPU)),
    }

    def fill(text: str) -> str:
        return text.format(**values)

    return {
        "service": diagnosis["service"],
        "action": book["action"],
        "title": fill(book["title"]),
        "risk": book["risk"],
        "commands": [fill(c) for c in book["commands"]],
        "verify": book["verify"],
        "undo": fill(book["undo"]),
        "cause": diagnosis["root_cause"],
        **{k: values[k] for k in ("deployment", "namespace", "bad_version", "good_version")},
    }


@remediator.handler
async def propose_fix(task: Task) -> dict[str, Any]:
    diagnosis = task.input.get("diagnosis")
    if not diagnosis:
        raise FatalError("no diagnosis to act on")
    plan = plan_fix(diagnosis, load_json("telemetry.json"))
    await task.context.put("plan", plan)  # the executor and the auditor read it from here
    return plan


# ---------------------------------------------------------------------- executor


@executor.handler
async def apply_fix(task: Task) -> dict[str, Any]:
    plan = await task.context.get("plan")
    if plan is None:
        raise FatalError("no plan in the run's context")
    if not plan["commands"]:
        raise FatalError(f"plan {plan['action']!r} has nothing to execute")
    executed = []
    for command in plan["commands"]:
        if task.cancelled:  # the run was cancelled or the step timed out: stop between commands
            raise RetryableError(f"interrupted before {command!r}")
        # Simulated: a real executor would run the command (or call the Kubernetes API)
        # here. The agent's heartbeats keep the step's heartbeatTimeout satisfied meanwhile.
        await asyncio.sleep(COMMAND_SECONDS)
        executed.append({"command": command, "status": "ok"})
        task.log.info("executed", command=command)
    svc = load_json("telemetry.json")["services"][plan["service"]]
    after = svc.get("after_rollback" if plan["action"] == "rollback" else "after_scale_out") or {}
    verified = after.get("error_ratio", 1.0) < 0.01
    result = {
        "action": plan["action"],
        "mode": "simulated",
        "executed": executed,
        "verified": verified,
        "after": after,
        "approved_by": task.input.get("approved_by"),
    }
    if not verified:
        raise FatalError(f"{plan['title']}: the error ratio did not recover", details=result)
    return result


# ----------------------------------------------------------------------- auditor


@auditor.handler
async def write_audit(task: Task) -> dict[str, Any]:
    alert = task.input.get("alert") or {}
    approval = task.input.get("approval")
    applied = task.input.get("applied")
    plan = await task.context.get("plan") or {}
    if applied and applied.get("verified"):
        outcome = "remediated"
    elif task.input.get("approval_phase") == "Failed":
        outcome = "rejected"
    elif plan.get("action") == "escalate":
        outcome = "escalated"
    else:
        outcome = "not remediated"
    decision = None
    if approval:
        decision = {
            "decision": approval["decision"],
            "by": approval["by"],
            "at": iso(approval["at"]),
            "comment": approval.get("comment"),
        }
    elif task.input.get("approval_error"):
        error = task.input["approval_error"]
        decision = {"decision": "rejected", "detail": error.get("message")}
    record = {
        "incident": f"{alert.get('labels', {}).get('alertname')}/{alert.get('fingerprint')}",
        "run": task.run_id,
        "service": plan.get("service"),
        "alert": {
            "startsAt": alert.get("startsAt"),
            "summary": (alert.get("annotations") or {}).get("summary"),
            "severity": (alert.get("labels") or {}).get("severity"),
        },
        "diagnosis": task.input.get("diagnosis"),
        "plan": {k: plan.get(k) for k in ("action", "title", "risk", "commands", "undo")},
        "approval": decision,
        "executed": (applied or {}).get("executed", []),
        "outcome": outcome,
    }
    path = os.environ.get("AUDIT_LOG")
    if path:
        await asyncio.to_thread(append_line, path, json.dumps(record, sort_keys=True))
    await task.context.put("audit", record)
    return record


# ---------------------------------------------------------------------- notifier


@notifier.handler
def notify(task: Task) -> dict[str, Any]:
    i = task.input
    icon = {"Succeeded": "[resolved]", "Failed": "[FAILED]", "Cancelled": "[cancelled]"}.get(
        i.get("phase"), ""
    )
    text = f"{icon} {i.get('alert')} on {i.get('service')}: remediation run {i.get('run')} {i.get('phase')}"
    if i.get("outcome"):
        text += f" - {i['outcome']}"
    if i.get("action"):
        text += f" ({i['action']}"
        text += f", approved by {i['approved_by']})" if i.get("approved_by") else ")"
    if i.get("message"):
        text += f". {i['message']}"
    url = os.environ.get("INCIDENT_WEBHOOK_URL")
    posted = False
    if url:
        request = urllib.request.Request(
            url,
            data=json.dumps({"text": text}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                posted = True
        except (urllib.error.URLError, TimeoutError) as exc:
            raise RetryableError(f"webhook failed: {exc}") from None
    return {"channel": i.get("channel", "#incidents"), "text": text, "posted": posted}


AGENTS = {a.name: a for a in (diagnostician, remediator, executor, auditor, notifier)}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in AGENTS:
        sys.exit(f"usage: python agents.py {{{'|'.join(AGENTS)}}}")
    AGENTS[sys.argv[1]].run()
