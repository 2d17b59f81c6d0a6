"""`cadenza approve|signal|cancel|audit` tell the truth: a running engine checks each command
against the run and the CLI says what happened, with an exit code a script can trust
(0 applied, 1 refused, 2 bad input, 3 no NATS or no engine). Real nats-server, real
`cadenza engine` processes, the CLI as a subprocess.

Waits are bounded polls for something that must happen, never a duration asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza._protocol import dumps, loads
from cadenza_operator.engine.audit import read_audit
from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.control import control_subject
from cadenza_operator.engine.definition import CompiledWorkflow, compile_workflow
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.engine.state import RunState
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from ..conftest import cadenza
from .harness import start_engine, unique_namespace

EXIT_OK, EXIT_REFUSED, EXIT_INVALID, EXIT_NO_ENGINE = 0, 1, 2, 3

# No agent: approvals and signals alone move this run, so the test controls every step.
GATED = WorkflowSpec.model_validate(
    {
        "steps": [
            {"name": "gate", "approval": {"approvers": ["ada"]}},
            {"name": "hold", "dependsOn": ["gate"], "waitFor": {"signal": "go"}},
            {"name": "final", "dependsOn": ["hold"], "approval": {}},
        ],
        "output": {"go": "${{ steps.hold.output }}"},
    }
)


@contextlib.contextmanager
def engines(url: str, log_dir: Path, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_engine(url, f"engine-{i}", log_dir) for i in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def answering(url: str, count: int) -> None:
    """Until `count` engines answer control requests: they are up. Bounded by time, not by
    requests: one engine that is up answers a request in a millisecond, so a count of
    requests ran out while a second engine was still importing on a busy CI machine."""
    nc = await nats.connect(url)
    names: set[str] = set()
    deadline = asyncio.get_running_loop().time() + 60
    try:
        while asyncio.get_running_loop().time() < deadline:
            try:
                msg = await nc.request(control_subject("default"), b'{"op":"cancel","run":"x"}', timeout=1)
                names.add(loads(msg.data)["engine"])
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                pass
            if len(names) >= count:
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"{count} engine(s) never answered on {url} within 60 s (answered: {names})")
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def one_engine(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `cadenza engine` on the session's nats-server, answering; yields the URL."""
    with engines(nats_server.url, tmp_path_factory.mktemp("engine"), 1):
        asyncio.run(answering(nats_server.url, 1))
        yield nats_server.url


class Runs:
    """Starts runs and reads their records, as any client of the engine's buckets may."""

    def __init__(self, client: RunClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.wf: CompiledWorkflow = compile_workflow("gated", GATED, namespace)

    async def start(self) -> str:
        run = await self.client.start(self.wf, {})
        await self.step_is(run, "gate", "WaitingApproval")
        return run

    async def state(self, run: str) -> RunState:
        state = await self.client.get(run)
        assert state is not None, run
        return state

    async def step_is(self, run: str, step: str, phase: str) -> None:
        async def check() -> bool:
            state = await self.client.get(run)
            return state is not None and step in state.steps and state.steps[step].phase == phase

        await poll(check, f"{run}: {step} {phase}")

    async def run_is(self, run: str, phase: str) -> RunState:
        async def check() -> RunState | None:
            state = await self.client.get(run)
            return state if state is not None and state.phase == phase else None

        return await poll(check, f"{run} {phase}")

    async def audit(self, run: str) -> list[dict[str, Any]]:
        return await read_audit(self.client.js, self.namespace, run)


async def poll(check: Any, what: str, timeout: float = 30) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := await check()):
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)
    return found


@pytest.fixture
async def runs(one_engine: str) -> AsyncIterator[Runs]:
    nc = await nats.connect(one_engine)
    engine_side = Engine(nc)
    await engine_side.open()  # infrastructure and buckets only: this process executes nothing
    client = engine_side.client
    try:
        yield Runs(client, unique_namespace())
    finally:
        await client.pub.close()
        await nc.close()


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cadenza, *args, env=env)


def refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == EXIT_REFUSED, result
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result


def applied(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == EXIT_OK, result
    assert message in result.stdout, result.stdout


async def test_commands_on_an_unknown_run_are_refused(runs: Runs, one_engine: str) -> None:
    ns = ("--nats", one_engine, "--namespace", runs.namespace)
    missing = f"no run nosuch-run in namespace {runs.namespace}"
    # A RUN that names no run at all is a bad argument (exit 2), said before any engine is asked.
    for args in (("approve", "nosuch-run", "gate"), ("signal", "nosuch-run", "go"), ("cancel", "nosuch-run")):
        unknown = await cli(*args, *ns)
        assert unknown.returncode == EXIT_INVALID and missing in unknown.stderr, unknown
    unknown = await cli("audit", "nosuch-run", *ns)
    assert unknown.returncode == EXIT_INVALID and missing in unknown.stderr, unknown
    # A run of another namespace is not one of this namespace's.
    run = await runs.start()
    elsewhere = ("--nats", one_engine, "--namespace", "elsewhere")
    refused(await cli("cancel", run, *elsewhere), f"no run {run} in namespace elsewhere")
    refused(await cli("audit", run, *elsewhere), f"run {run} is in namespace {runs.namespace}")
    assert (await runs.state(run)).phase == "Running"


async def test_a_run_goes_through_the_cli_and_every_wrong_command_is_refused(
    runs: Runs, one_engine: str
) -> None:
    run = await runs.start()
    ns = ("--nats", one_engine, "--namespace", runs.namespace)
    refused(
        await cli("approve", run, "final", *ns),
        f"step final of run {run} is not waiting for approval (it is Pending)",
    )
    refused(await cli("approve", run, "hold", *ns), f"step hold of run {run} is not an approval step")
    refused(await cli("approve", run, "nope", *ns), f"run {run} has no step nope")
    # Someone not in the approvers: refused, and nothing reaches the run.
    refused(
        await cli("approve", run, "gate", "--by", "bob", *ns),
        "refused: bob is not an approver of gate (approvers: ada)",
    )
    refused(await cli("signal", run, "stop", *ns), "no step of workflow gated waits for signal stop")

    # A signal no step waits for yet is remembered; CADENZA_NATS_URL stands in for --nats.
    env = {**os.environ, "CADENZA_NATS_URL": one_engine, "CADENZA_LOG_FORMAT": "json"}
    sent = await cli("signal", run, "go", "--payload", '{"x": 1}', "--namespace", runs.namespace, env=env)
    applied(sent, f"signal go sent to {run} (no step waits for it yet")
    await poll(lambda: _has_reason(runs, run, "signal go received"), "the signal in the audit trail")
    refused(await cli("signal", run, "go", *ns), f"run {run} already received signal go")
    # The signal, sent after bob's attempt, is in the trail: bob's attempt would be before it.
    assert (await runs.state(run)).steps["gate"].phase == "WaitingApproval"
    assert not [r for r in await runs.audit(run) if "bob" in json.dumps(r)]

    applied(await cli("approve", run, "gate", "--by", "ada", *ns), f"approved {run}/gate as ada")
    await runs.step_is(run, "final", "WaitingApproval")  # hold took the remembered signal
    refused(
        await cli("approve", run, "gate", "--by", "ada", *ns),
        f"step gate of run {run} is not waiting for approval (it is Succeeded)",
    )
    applied(await cli("approve", run, "final", "--comment", "ship it", *ns), f"approved {run}/final as cli")
    state = await runs.run_is(run, "Succeeded")
    assert state.outputs == {"go": {"x": 1}}

    # A finished run takes no command.
    finished = f"run {run} already Succeeded"
    refused(await cli("approve", run, "final", *ns), finished)
    refused(await cli("signal", run, "go", *ns), finished)
    refused(await cli("cancel", run, *ns), finished)
    trail = await cli("audit", run, *ns, "--output", "json")
    assert trail.returncode == EXIT_OK, trail
    actors = {(r["step"], r["actor"]) for r in json.loads(trail.stdout)}
    assert ("gate", "ada") in actors and not any(actor == "bob" for _, actor in actors)


async def _has_reason(runs: Runs, run: str, reason: str) -> bool:
    return any(r["reason"] == reason for r in await runs.audit(run))


async def test_cancel_applies_once_then_is_refused(runs: Runs, one_engine: str) -> None:
    run = await runs.start()
    ns = ("--nats", one_engine, "--namespace", runs.namespace)
    applied(await cli("cancel", run, "--reason", "not needed", "--by", "ops", *ns), f"cancellation of {run}")
    state = await runs.run_is(run, "Cancelled")
    assert state.cancelledBy == "ops"
    refused(await cli("cancel", run, *ns), f"run {run} already Cancelled")


@pytest.mark.parametrize("payload", ["{not json", "[" * 100_000])
async def test_bad_payload_exits_2_naming_the_option(payload: str, one_engine: str) -> None:
    result = await cli("signal", "some-run", "go", "--payload", payload, "--nats", one_engine)
    assert result.returncode == EXIT_INVALID, result
    assert "--payload" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result


async def test_no_engine_exits_3_saying_so(fresh_nats: NatsServer) -> None:
    """No engine at all (NATS answers "no responders" at once), and an engine that hangs
    (the CLI gives up after --wait seconds): exit 3 with a message, not a success."""
    url = fresh_nats.url
    result = await cli("approve", "some-run", "gate", "--nats", url)
    assert result.returncode == EXIT_NO_ENGINE, result
    assert f"no engine answered on NATS {url} within 5s; is an engine running?" in result.stderr
    nc = await nats.connect(url)
    try:
        await nc.subscribe(control_subject("default"), cb=_never_answer)  # alive, silent
        await nc.flush()
        result = await cli("cancel", "some-run", "--nats", url, "--wait", "1")
        assert result.returncode == EXIT_NO_ENGINE, result
        assert f"no engine answered on NATS {url} within 1s" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout, result
    finally:
        await nc.close()


async def _never_answer(msg: Any) -> None:
    return None


async def test_two_engines_answer_each_request_once(fresh_nats: NatsServer, tmp_path: Path) -> None:
    url = fresh_nats.url
    with engines(url, tmp_path, 2):
        await answering(url, 2)
        nc = await nats.connect(url)
        engine_side = Engine(nc)
        await engine_side.open()  # the infrastructure, as an engine makes it
        client = engine_side.client
        try:
            runs = Runs(client, unique_namespace())
            run = await runs.start()
            replies: dict[str, list[dict[str, Any]]] = {}
            inbox = f"_INBOX.{uuid.uuid4().hex}"

            async def on_reply(msg: Any) -> None:
                replies.setdefault(msg.subject, []).append(loads(msg.data))

            await nc.subscribe(f"{inbox}.>", cb=on_reply)
            subject = control_subject(runs.namespace)

            async def ask(key: str, request: dict[str, Any]) -> None:
                await nc.publish(subject, dumps(request), reply=f"{inbox}.{key}")

            async def both_engines_answered(prefix: str) -> None:
                """Each engine answers its requests in order: once both answered one sent
                after the others, any second answer to those has arrived too."""
                for i in range(1000):
                    await ask(f"{prefix}{i}", {"op": "cancel", "run": "nosuch-run"})
                    await nc.flush()
                    names = {r["engine"] for k, rs in replies.items() if prefix in k for r in rs}
                    if len(names) == 2:
                        return
                    await asyncio.sleep(0.02)
                pytest.fail(f"both engines never answered ({sum(map(len, replies.values()))} answers)")

            for i in range(20):
                await ask(f"bob{i}", {"op": "approve", "run": run, "step": "gate", "by": "bob"})
            await ask("ada", {"op": "approve", "run": run, "step": "gate", "by": "ada"})
            await both_engines_answered("after")
            for key in [f"bob{i}" for i in range(20)] + ["ada"]:
                assert len(replies.get(f"{inbox}.{key}", [])) == 1, (key, replies.get(f"{inbox}.{key}"))
            assert all(not replies[f"{inbox}.bob{i}"][0]["ok"] for i in range(20))
            assert replies[f"{inbox}.ada"][0]["ok"], replies[f"{inbox}.ada"]
            await runs.step_is(run, "hold", "Running")
            approvals = [r for r in await runs.audit(run) if r["reason"] == "approved by ada"]
            assert len(approvals) == 1, approvals
        finally:
            await client.pub.close()
            await nc.close()


async def test_no_command_on_another_namespace_reaches_a_run(runs: Runs, one_engine: str) -> None:
    """Issue 13: a control request on namespace B is refused for a run of A, whatever it asks;
    a client cannot claim a group (only the operator vouches for one, after admission)."""
    run = await runs.start()
    nc = await nats.connect(one_engine)
    try:

        async def ask(namespace: str, request: dict[str, Any]) -> dict[str, Any]:
            msg = await nc.request(control_subject(namespace), dumps({"run": run, **request}), timeout=10)
            return dict(loads(msg.data))

        for request in (
            {"op": "approve", "step": "gate", "approved": True, "by": "ada"},
            {"op": "signal", "name": "go", "payload": {}},
            {"op": "resume", "tokens": 10},
            {"op": "cancel", "reason": "not yours"},
        ):
            reply = await ask("tenant-b", request)
            assert reply["ok"] is False and reply["error"] == f"no run {run} in namespace tenant-b", reply
        claimed = await ask(runs.namespace, {"op": "approve", "step": "gate", "by": "eve [group:admins]"})
        assert claimed["ok"] is False and "only the operator vouches for a group" in claimed["error"], claimed
    finally:
        await nc.close()
    state = await runs.state(run)
    assert state.phase == "Running" and state.steps["gate"].phase == "WaitingApproval"
    assert state.cancelledBy is None and not state.signals
