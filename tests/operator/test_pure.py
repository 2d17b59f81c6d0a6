"""The operator's pure parts: builders, autoscaling, status summaries, Events, settings."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from typing import Any

import pytest
from cadenza_operator.engine.state import Attempt, ForEachState, RunState, StepState
from cadenza_operator.kube import builders
from cadenza_operator.kube.autoscaling import desired_replicas, prune, stabilized
from cadenza_operator.kube.runs import (
    decisions_from_annotations,
    mirrored_run_manifest,
    run_id_for,
    status_patch,
)
from cadenza_operator.kube.settings import OperatorSettings, SettingsError
from cadenza_operator.kube.status import (
    MAX_STEPS_LISTED,
    RunRecord,
    agent_status,
    human_duration,
    merge_patch_apply,
    merge_patch_diff,
    phases_of_status,
    run_status,
    runs_to_collect,
    transitions,
    workflow_run_counts,
)
from cadenza_operator.models import Agent, AutoscalingSpec
from hypothesis import given
from hypothesis import strategies as st


def _agent(**spec: Any) -> Agent:
    return Agent.model_validate(
        {
            "metadata": {"name": "classifier", "namespace": "team-a"},
            "spec": {"image": "registry.example/agents:1", **spec},
        }
    )


# ------------------------------------------------------------------------ builders


def test_deployment_env_security_and_command() -> None:
    agent = _agent(
        command=["python", "agents.py", "classifier"],
        concurrency=6,
        ackWait="1m",
        env=[{"name": "MODEL", "value": "big"}, {"name": "CADENZA_LOG_FORMAT", "value": "console"}],
    )
    deployment = builders.build_deployment(agent, nats_url="nats://nats:4222", replicas=3)
    assert deployment["metadata"]["name"] == "classifier-agent"
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"] == {"matchLabels": {"cadenza.dev/agent": "classifier"}}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "CADENZA_NATS_URL": "nats://nats:4222",
        "CADENZA_AGENT": "classifier",
        "CADENZA_NAMESPACE": "team-a",
        "CADENZA_CONCURRENCY": "6",
        "CADENZA_ACK_WAIT": "60",
        "CADENZA_LOG_FORMAT": "console",  # spec.env may override on purpose
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
        "MODEL": "big",
    }
    assert container["command"] == ["python", "agents.py", "classifier"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["serviceAccountName"] == "classifier-agent"
    assert pod["automountServiceAccountToken"] is False
    assert "ports" not in container


def test_a_user_service_account_keeps_its_token_setting() -> None:
    pod = builders.build_deployment(_agent(serviceAccountName="reader"), nats_url="n", replicas=1)["spec"][
        "template"
    ]["spec"]
    assert pod["serviceAccountName"] == "reader"
    assert "automountServiceAccountToken" not in pod


def test_metrics_port_and_service_only_when_enabled() -> None:
    assert builders.build_metrics_service(_agent()) is None
    assert builders.build_metrics_service(_agent(metrics={"enabled": False})) is None
    agent = _agent(metrics={"enabled": True, "port": 9200})
    service = builders.build_metrics_service(agent)
    assert service is not None
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9200, "targetPort": "metrics", "protocol": "TCP"}
    ]
    (container,) = builders.build_deployment(agent, nats_url="n", replicas=1)["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9200, "protocol": "TCP"}]


def test_a_deployment_needs_an_image() -> None:
    agent = Agent.model_validate({"metadata": {"name": "a"}, "spec": {"command": ["x"]}})
    with pytest.raises(builders.SpecError) as caught:
        builders.build_deployment(agent, nats_url="n", replicas=1)
    assert caught.value.path == "spec.image"


def test_spec_hash_ignores_replicas_and_sees_everything_else() -> None:
    base = builders.build_deployment(_agent(), nats_url="n", replicas=1)
    scaled = builders.build_deployment(_agent(), nats_url="n", replicas=5)
    changed = builders.build_deployment(_agent(concurrency=9), nats_url="n", replicas=1)
    moved = builders.build_deployment(_agent(), nats_url="other", replicas=1)
    annotation = builders.SPEC_HASH_ANNOTATION
    assert base["metadata"]["annotations"][annotation] == scaled["metadata"]["annotations"][annotation]
    assert base["metadata"]["annotations"][annotation] != changed["metadata"]["annotations"][annotation]
    assert base["metadata"]["annotations"][annotation] != moved["metadata"]["annotations"][annotation]
    relabelled = copy.deepcopy(base)
    relabelled["metadata"]["labels"]["team"] = "a"  # kopf.adopt copies the owner's labels
    builders.stamp(relabelled)
    assert relabelled["metadata"]["annotations"][annotation] != base["metadata"]["annotations"][annotation]


def test_service_account_mounts_no_token() -> None:
    account = builders.build_service_account(_agent())
    assert account["metadata"]["name"] == "classifier-agent"
    assert account["automountServiceAccountToken"] is False


# --------------------------------------------------------------------- autoscaling


@pytest.mark.parametrize(
    ("load", "low", "high", "target", "expected"),
    [
        (0, 0, 5, 10, 0),  # idle, scale to zero allowed
        (0, 1, 5, 10, 1),  # idle, but at least one
        (1, 0, 5, 10, 1),  # the first task brings a replica back
        (10, 0, 5, 10, 1),
        (11, 0, 5, 10, 2),
        (1000, 0, 5, 10, 5),  # capped
        (7, 3, 5, 10, 3),
    ],
)
def test_desired_replicas(load: int, low: int, high: int, target: int, expected: int) -> None:
    spec = AutoscalingSpec(minReplicas=low, maxReplicas=high, targetPendingPerReplica=target)
    assert desired_replicas(load, spec) == expected


@given(
    st.integers(0, 100_000),
    st.integers(0, 100_000),
    st.integers(0, 20),
    st.integers(1, 50),
    st.integers(1, 100),
)
def test_desired_replicas_is_monotone_and_within_bounds(
    a: int, b: int, low: int, span: int, target: int
) -> None:
    spec = AutoscalingSpec(minReplicas=low, maxReplicas=low + span, targetPendingPerReplica=target)
    lo, hi = sorted((a, b))
    assert low <= desired_replicas(lo, spec) <= desired_replicas(hi, spec) <= low + span


def test_scale_down_waits_for_the_window_scale_up_does_not() -> None:
    history = [(0.0, 5), (30.0, 1)]
    assert stabilized(history, now=30.0, window=60.0) == 5  # still wanted 5 recently
    assert stabilized(history, now=61.0, window=60.0) == 1
    history.append((62.0, 8))
    assert stabilized(history, now=62.0, window=60.0) == 8
    prune(history, now=100.0, window=60.0)
    assert history == [(62.0, 8)]


# -------------------------------------------------------------------------- status


def _run(**kw: Any) -> RunState:
    base: dict[str, Any] = {"run": "r-1", "workflow": "w", "definition": "d", "createdAt": 1_700_000_000.0}
    return RunState(**{**base, **kw})


def test_run_status_of_a_finished_run() -> None:
    state = _run(
        phase="Succeeded",
        startedAt=1_700_000_000.0,
        finishedAt=1_700_000_065.5,
        outputs={"a": 1},
        steps={
            "one": StepState(
                phase="Succeeded", attempt=2, attempts=[Attempt(n=1, queuedAt=0), Attempt(n=2, queuedAt=1)]
            ),
            "two": StepState(phase="Skipped"),
        },
    )
    status = run_status(state)
    assert status["phase"] == "Succeeded"
    assert status["runId"] == "r-1"
    assert status["startedAt"] == "2023-11-14T22:13:20Z"
    assert status["finishedAt"] == "2023-11-14T22:14:25Z"
    assert status["progress"] == "2/2"
    assert status["duration"] == "1m5s"
    assert status["steps"] == {
        "one": {"phase": "Succeeded", "attempts": 2},
        "two": {"phase": "Skipped", "attempts": 0},
    }
    assert status["outputs"] == {"a": 1}
    assert status["conditions"][0]["type"] == "Succeeded" and status["conditions"][0]["status"] == "True"


def test_foreach_steps_are_counts_not_items() -> None:
    fe = ForEachState(
        total=10_000,
        next=1200,
        counts={"Succeeded": 1000, "Failed": 3},
        failed=[4, 17, 99],
        running={str(i): StepState() for i in range(1003, 1200)},
    )
    state = _run(phase="Running", startedAt=1.0, steps={"fan": StepState(phase="Running", forEach=fe)})
    summary = run_status(state)["steps"]["fan"]
    assert summary["items"] == {
        "total": 10_000,
        "Failed": 3,
        "Succeeded": 1000,
        "Running": 197,
        "Pending": 8800,
    }
    assert summary["failedItems"] == [4, 17, 99]
    assert len(json.dumps(summary)) < 300


def test_large_outputs_become_a_reference() -> None:
    big = {"text": "x" * 20_000}
    status = run_status(_run(phase="Succeeded", outputs=big), outputs_limit=8192)
    assert isinstance(status["outputs"], str)
    assert status["outputs"].startswith("kv://cadenza_runs/r-1#outputs")
    assert run_status(_run(phase="Succeeded", outputs={"small": 1}), outputs_limit=8192)["outputs"] == {
        "small": 1
    }


def test_outputs_stored_apart_from_the_record_stay_a_reference_in_status() -> None:
    # Run outputs too large for the run record (64 MiB, say) are never copied into status.
    status = run_status(_run(phase="Succeeded", outputsRef="r-1._output"))
    assert status["outputs"] == "kv://cadenza_outputs/r-1._output (too large for status)"


def test_many_steps_are_listed_boundedly_failures_first() -> None:
    steps = {f"s{i}": StepState(phase="Succeeded") for i in range(200)}
    steps["s150"] = StepState(phase="Failed", message="boom")
    steps["s199"] = StepState(phase="WaitingApproval")
    status = run_status(_run(phase="Running", steps=steps))
    assert len(status["steps"]) == MAX_STEPS_LISTED
    assert status["stepsNotListed"] == 150
    assert "s150" in status["steps"] and "s199" in status["steps"]
    assert status["steps"]["s150"]["message"] == "boom"


def test_waiting_for_approval_is_a_condition_and_a_message() -> None:
    status = run_status(_run(phase="Running", steps={"gate": StepState(phase="WaitingApproval")}))
    assert "cadenza.dev/approve=gate" in status["message"]
    assert [c["type"] for c in status["conditions"]] == ["Succeeded", "WaitingApproval"]


def test_transitions_post_each_event_once() -> None:
    running = _run(
        phase="Running", steps={"a": StepState(phase="Running"), "gate": StepState(phase="Pending")}
    )
    assert [e.reason for e in transitions({}, running)] == ["RunStarted"]
    failed = _run(
        phase="Failed",
        message="a failed",
        steps={"a": StepState(phase="Failed", attempt=3, message="boom"), "gate": StepState(phase="Skipped")},
    )
    events = transitions({"": "Running", "a": "Running", "gate": "Pending"}, failed)
    assert [(e.type, e.reason) for e in events] == [("Warning", "RunFailed"), ("Warning", "RetriesExhausted")]
    assert "after 3 attempts: boom" in events[1].message
    # Nothing new since what status already says: nothing posted (e.g. after a restart).
    assert transitions(phases_of_status(run_status(failed)), failed) == []
    waiting = _run(phase="Running", steps={"gate": StepState(phase="WaitingApproval")})
    assert [e.reason for e in transitions({"": "Running"}, waiting)] == ["ApprovalWaiting"]
    quick = _run(phase="Succeeded", startedAt=1.0, finishedAt=1.5)
    assert [e.reason for e in transitions({}, quick)] == ["RunStarted", "RunSucceeded"]


def test_a_budget_pause_and_its_resume_are_events_and_a_condition() -> None:
    message = "BudgetExceeded: run budget reached: 20 tokens used of a budget of 10"
    paused = _run(phase="Paused", message=message, steps={"greet": StepState(phase="Pending")})
    events = transitions({"": "Running", "greet": "Pending"}, paused)
    assert [(e.type, e.reason, e.message) for e in events] == [("Warning", "BudgetExceeded", message)]
    status = run_status(paused)
    assert status["phase"] == "Paused"
    assert status["conditions"][0] | {"lastTransitionTime": None} == {
        "type": "Succeeded",
        "status": "Unknown",
        "reason": "Paused",
        "message": message,
        "lastTransitionTime": None,
    }
    # Nothing twice (a restart), and a resume is not a second start.
    assert transitions(phases_of_status(status), paused) == []
    resumed = _run(phase="Running", steps={"greet": StepState(phase="Pending")})
    events = transitions(phases_of_status(status), resumed)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Resumed")]
    assert [e.reason for e in transitions({}, paused)] == ["RunStarted", "BudgetExceeded"]


json_values = st.recursive(
    st.one_of(st.booleans(), st.integers(), st.text(max_size=5)),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=4), json_values, max_size=5)


@given(json_objects, json_objects)
def test_merge_patch_diff_takes_old_to_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    assert merge_patch_apply(old, merge_patch_diff(old, new)) == new
    assert merge_patch_diff(new, new) == {}


def test_status_patch_removes_counts_that_are_gone() -> None:
    written = {
        "phase": "Running",
        "steps": {"fan": {"phase": "Running", "items": {"total": 2, "Running": 2}}},
    }
    wanted = {
        "phase": "Succeeded",
        "steps": {"fan": {"phase": "Succeeded", "items": {"total": 2, "Succeeded": 2}}},
    }
    assert status_patch(written, wanted) == {
        "phase": "Succeeded",
        "steps": {"fan": {"phase": "Succeeded", "items": {"Running": None, "Succeeded": 2}}},
    }
    assert status_patch({**written, "other": 1}, written) == {}  # keys the mirror does not own are left alone


def test_workflow_run_counts_and_history() -> None:
    runs = [
        RunRecord("a", "Succeeded", "2026-01-01T00:00:01Z", "2026-01-01T00:00:05Z", mirrored=True),
        RunRecord("b", "Failed", "2026-01-01T00:00:02Z", "2026-01-01T00:00:03Z", mirrored=True),
        RunRecord("c", "Running", "2026-01-01T00:00:03Z", "", mirrored=True),
        RunRecord("d", "Succeeded", "2026-01-01T00:00:04Z", "2026-01-01T00:00:06Z", mirrored=False),
        RunRecord("e", "", "2026-01-01T00:00:05Z", "", mirrored=False),
    ]
    assert workflow_run_counts(runs) == {
        "activeRuns": 2,
        "lastRun": "e",
        "lastRunPhase": "Pending",
        "runs": {"Failed": 1, "Succeeded": 2},
    }
    assert workflow_run_counts([]) == {"activeRuns": 0, "lastRun": "", "lastRunPhase": "", "runs": {}}
    # Only finished mirrored runs are collected, oldest finished first; running ones never.
    assert runs_to_collect(runs, 1) == ["b"]
    assert sorted(runs_to_collect(runs, 0)) == ["a", "b"]
    assert runs_to_collect(runs, 5) == []


def test_agent_status_conditions() -> None:
    ready = agent_status(generation=3, replicas=2, ready_replicas=2, pending=0, in_flight=1, now=10.0)
    assert ready["ready"] == "2/2" and ready["observedGeneration"] == 3 and ready["inFlight"] == 1
    assert [(c["type"], c["status"], c["reason"]) for c in ready["conditions"]] == [
        ("Ready", "True", "ReplicasReady"),
        ("Degraded", "False", "AsExpected"),
    ]
    stuck = agent_status(
        generation=3,
        replicas=2,
        ready_replicas=0,
        pending=7,
        in_flight=0,
        now=20.0,
        previous=ready["conditions"],
    )
    assert [(c["type"], c["status"], c["reason"]) for c in stuck["conditions"]] == [
        ("Ready", "False", "ReplicasNotReady"),
        ("Degraded", "True", "NoReadyReplicas"),
    ]
    # An unchanged condition keeps its transition time: an unchanged Agent writes nothing.
    again = agent_status(
        generation=3,
        replicas=2,
        ready_replicas=0,
        pending=7,
        in_flight=0,
        now=30.0,
        previous=stuck["conditions"],
    )
    assert again == stuck
    broken = agent_status(
        generation=1,
        replicas=1,
        ready_replicas=0,
        pending=None,
        in_flight=None,
        queue_problem="task queue unavailable: timeout",
    )
    assert broken["conditions"][1]["reason"] == "QueueUnavailable"
    zero = agent_status(generation=1, replicas=0, ready_replicas=0, pending=0, in_flight=0)
    assert zero["conditions"][0]["reason"] == "ScaledToZero"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.45, "450ms"), (12, "12s"), (65, "1m5s"), (120, "2m"), (3720, "1h2m"), (3600, "1h"), (90000, "1d1h")],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


# ---------------------------------------------------------------------------- runs


def test_run_ids_are_deterministic_and_subject_safe() -> None:
    uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    assert run_id_for("ns", "nightly.report", uid) == "nightly-report-0f1e2d3c4b"
    assert run_id_for("ns", "nightly.report", uid) == run_id_for("ns", "nightly.report", uid)
    assert run_id_for("ns", "x", "ffff" + uid[4:]) != run_id_for("ns", "x", uid)
    assert "." not in run_id_for("ns", "a.b.c" * 30, uid)


def test_a_run_id_annotation_is_followed_only_by_a_mirror_of_a_triggered_run_of_its_namespace() -> None:
    from cadenza_operator.engine.state import RunState
    from cadenza_operator.kube.runs import is_mirror_of, looks_like_mirror

    mirror = {"cadenza.dev/workflow": "nightly", "cadenza.dev/trigger": "nats"}
    assert looks_like_mirror("nightly-t42", mirror, "nightly-t42")
    assert not looks_like_mirror("mine", mirror, "nightly-t42")  # a mirror is named after its run
    assert not looks_like_mirror("nightly-t42", {}, "nightly-t42")

    def record(namespace: str, **labels: str) -> RunState:
        return RunState(
            run="nightly-t42", namespace=namespace, workflow="w", definition="d", createdAt=0, labels=labels
        )

    assert is_mirror_of("ops", record("ops", **{"cadenza.dev/trigger": "nats"}))
    assert not is_mirror_of("tenant-b", record("ops"))  # another namespace's run
    assert not is_mirror_of("ops", record("ops", **{"cadenza.dev/workflowrun": "someone-elses"}))


def test_approvers_are_users_or_groups_a_group_only_as_vouched_for() -> None:
    from cadenza_operator.engine.decide.events import is_approver
    from cadenza_operator.kube.runs import approver_identity

    assert is_approver([], "anyone")
    assert is_approver(["alice", "group:finance"], "alice")
    assert not is_approver(["alice"], "bob")
    assert not is_approver(["group:finance"], "finance")  # a user named like the group is not it
    bob_in_finance = approver_identity(
        {"cadenza.dev/approved-by": "bob", "cadenza.dev/approved-by-group": "finance"}
    )
    assert bob_in_finance == "bob [group:finance]"
    assert is_approver(["group:finance"], bob_in_finance)
    assert is_approver(["bob"], bob_in_finance)
    assert not is_approver(["group:ops"], bob_in_finance)
    assert not is_approver(["group:finance"], "bob [group:finance")
    assert approver_identity({}) == "kubectl"


def test_decisions_from_annotations() -> None:
    assert decisions_from_annotations({}) == {}
    assert decisions_from_annotations({"cadenza.dev/approve": "a, b", "cadenza.dev/reject": "b"}) == {
        "a": True,
        "b": False,
    }


def test_mirrored_run_manifest() -> None:
    from cadenza_operator.engine.definition import compile_workflow
    from cadenza_operator.models import WorkflowSpec

    wf = compile_workflow(
        "nightly", WorkflowSpec.model_validate({"steps": [{"name": "a", "agent": "x"}]}), "ops"
    )
    body = mirrored_run_manifest(wf, "nightly-t42", "schedule")
    assert body["metadata"] == {
        "name": "nightly-t42",
        "namespace": "ops",
        "labels": {"cadenza.dev/workflow": "nightly", "cadenza.dev/trigger": "schedule"},
        "annotations": {"cadenza.dev/run-id": "nightly-t42"},
    }
    assert body["spec"] == {"workflowRef": "nightly"}


def test_the_mirror_of_a_retry_is_labelled_with_the_retried_workflowrun() -> None:
    from cadenza_operator.engine.definition import compile_workflow
    from cadenza_operator.kube.runs import looks_like_mirror, run_record
    from cadenza_operator.kube.status import runs_to_collect
    from cadenza_operator.models import WorkflowSpec

    wf = compile_workflow(
        "nightly", WorkflowSpec.model_validate({"steps": [{"name": "a", "agent": "x"}]}), "ops"
    )
    body = mirrored_run_manifest(
        wf, "nightly-0a1b2c3d4e", "retry", retry_of="first-7f3e", retried_name="first", from_step="a"
    )
    meta = body["metadata"]
    assert meta["name"] == "nightly-0a1b2c3d4e"
    assert meta["labels"] == {"cadenza.dev/workflow": "nightly", "cadenza.dev/retry-of": "first"}
    assert meta["annotations"] == {
        "cadenza.dev/run-id": "nightly-0a1b2c3d4e",
        "cadenza.dev/retry-of-run": "first-7f3e",
        "cadenza.dev/retry-from": "a",
    }
    # followed as a mirror, and subject to runHistoryLimit as the mirrors of triggered runs are
    assert looks_like_mirror(meta["name"], meta["labels"], "nightly-0a1b2c3d4e")
    record = run_record(
        meta["name"], meta["labels"], body["spec"], {"phase": "Failed"}, "2026-01-01T00:00:00Z"
    )
    assert runs_to_collect([record], 0) == [meta["name"]]
    # a WorkflowRun name no label value can hold (too long, or a dot at its end): the run id
    for name in ("x" * 64, "first."):
        labels = mirrored_run_manifest(wf, "n-1", "retry", retry_of="First.Run", retried_name=name)[
            "metadata"
        ]
        assert labels["labels"]["cadenza.dev/retry-of"] == "first-run"
        assert "cadenza.dev/retry-from" not in labels["annotations"]


# ------------------------------------------------------------------------ settings


def test_settings_from_the_environment() -> None:
    settings = OperatorSettings.from_env(
        {
            "CADENZA_NATS_URL": "nats://nats.cadenza:4222",
            "CADENZA_NATS_CREDS": "/etc/nats/creds",
            "CADENZA_WATCH_NAMESPACES": "team-a, team-b,",
            "CADENZA_METRICS_PORT": "9191",
            "CADENZA_HEALTH_PORT": "8181",
            "CADENZA_LOG_FORMAT": "console",
            "CADENZA_PEERING": "prod",
            "POD_ID": "cadenza-0",
            "CADENZA_STATUS_INTERVAL": "2.5",
        }
    )
    assert settings.nats_url == "nats://nats.cadenza:4222"
    assert settings.nats_creds == "/etc/nats/creds"
    assert settings.agents_nats_url == "nats://nats.cadenza:4222"
    assert settings.watch_namespaces == ("team-a", "team-b") and not settings.clusterwide
    assert (settings.metrics_port, settings.health_port) == (9191, 8181)
    assert settings.log_format == "console"
    assert settings.peering == "prod" and settings.peer_id == "cadenza-0"
    assert settings.status_interval == 2.5


def test_settings_defaults_and_standalone() -> None:
    defaults = OperatorSettings.from_env({})
    assert defaults.clusterwide and defaults.peering == "cadenza"
    assert (defaults.metrics_port, defaults.health_port) == (9090, 8080)
    assert OperatorSettings.from_env({"CADENZA_PEERING": ""}).peering == ""  # set but empty: standalone
    assert OperatorSettings.from_env({"CADENZA_AGENT_NATS_URL": "nats://edge:4222"}).agents_nats_url == (
        "nats://edge:4222"
    )


@pytest.mark.parametrize(
    "env",
    [{"CADENZA_METRICS_PORT": "ninety"}, {"CADENZA_STATUS_INTERVAL": "-1"}, {"CADENZA_LOG_FORMAT": "xml"}],
)
def test_settings_errors_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match=next(iter(env))):
        OperatorSettings.from_env(env)


def test_every_setting_is_documented() -> None:
    import ast
    import inspect

    from cadenza_operator.kube import settings as module

    tree = ast.parse(inspect.getsource(module.OperatorSettings))
    body = tree.body[0].body  # type: ignore[attr-defined]
    documented = {
        node.target.id
        for node, after in itertools.pairwise(body)
        if isinstance(node, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
    }
    fields = {f.name for f in dataclasses.fields(OperatorSettings)}
    assert fields == documented


def test_nats_credentials_secret_is_mounted_read_only_and_named_in_the_env() -> None:
    agent = _agent(env=[{"name": "EXTRA", "value": "1"}])
    plain = builders.build_deployment(agent, nats_url="n", replicas=1)["spec"]["template"]["spec"]
    assert "CADENZA_NATS_CREDS" not in {e["name"] for e in plain["containers"][0]["env"]}
    assert [v["name"] for v in plain["volumes"]] == ["tmp"]

    pod = builders.build_deployment(agent, nats_url="n", replicas=1, nats_creds=("agents-nats", "a.creds"))[
        "spec"
    ]["template"]["spec"]
    (container,) = pod["containers"]
    volume = next(v for v in pod["volumes"] if v["name"] == "nats-creds")
    assert volume["secret"] == {
        "secretName": "agents-nats",
        "defaultMode": 0o440,
        "items": [{"key": "a.creds", "path": "a.creds"}],
    }
    mount = next(m for m in container["volumeMounts"] if m["name"] == "nats-creds")
    assert mount["readOnly"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CADENZA_NATS_CREDS"] == f"{mount['mountPath']}/a.creds"
    assert env["EXTRA"] == "1"
    # A changed Secret is a changed Deployment: the operator patches it in place.
    other = builders.build_deployment(agent, nats_url="n", replicas=1, nats_creds=("other", "a.creds"))
    this = builders.build_deployment(agent, nats_url="n", replicas=1, nats_creds=("agents-nats", "a.creds"))
    assert builders.spec_hash(other) != builders.spec_hash(this)


def test_agent_nats_credentials_settings() -> None:
    assert OperatorSettings.from_env({}).agents_nats_creds is None
    settings = OperatorSettings.from_env({"CADENZA_AGENT_NATS_CREDS_SECRET": "agents-nats"})
    assert settings.agents_nats_creds == ("agents-nats", "nats.creds")
    settings = OperatorSettings.from_env(
        {"CADENZA_AGENT_NATS_CREDS_SECRET": "agents-nats", "CADENZA_AGENT_NATS_CREDS_KEY": "a.creds"}
    )
    assert settings.agents_nats_creds == ("agents-nats", "a.creds")


def _workflowrun_body(spec: dict[str, Any]) -> Any:
    import kopf

    return kopf.Body(
        {"apiVersion": "cadenza.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "r"}, "spec": spec}
    )


def test_kopfs_copy_of_a_workflowrun_keeps_a_digest_of_the_input_not_the_input() -> None:
    from cadenza_operator.kube.main import CompactDiffBase

    storage = CompactDiffBase(prefix="operator.cadenza.dev", key="last-handled-configuration")
    big = {"texts": [f"item number {i}" for i in range(10_000)]}
    essence = storage.build(body=_workflowrun_body({"workflowRef": "w", "input": big}))
    assert essence["spec"]["workflowRef"] == "w"
    assert len(json.dumps(essence)) < 200  # the annotation stays small whatever the input
    same = storage.build(body=_workflowrun_body({"workflowRef": "w", "input": dict(big)}))
    edited = storage.build(body=_workflowrun_body({"workflowRef": "w", "input": {**big, "extra": 1}}))
    none = storage.build(body=_workflowrun_body({"workflowRef": "w"}))
    assert essence == same
    assert essence not in (edited, none)


async def test_spec_edits_are_reported_but_not_a_configuration_stored_before_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cadenza_operator.kube import runs

    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        runs.events, "warning", lambda body, reason, message: posted.append((reason, message))
    )
    body = _workflowrun_body({"workflowRef": "w"})
    digest = {"sha256": "0123456789abcdef"}

    # Stored by the previous version (no input digest): an upgrade, not an edit.
    await runs.workflowrun_spec_changed(
        body=body, old={"workflowRef": "w"}, new={"workflowRef": "w", "input": digest}
    )
    assert posted == []

    await runs.workflowrun_spec_changed(
        body=body,
        old={"workflowRef": "w", "input": digest},
        new={"workflowRef": "v", "input": {"sha256": "f" * 16}},
    )
    ((reason, message),) = posted
    assert reason == "SpecChangeIgnored"
    assert message.startswith("spec.input, spec.workflowRef changed after the WorkflowRun was created")
