"""The console's HTTP side: aiohttp handlers over the engine's client and control path.

Pages and live fragments are HTML rendered here (jinja2, autoescaped: every run id, step
name, input, output and error is user data). Actions are HTML forms posted to
`/runs/<ns>/<run>/<op>`: the request goes to the engine's control responder
(engine/control.py `ControlResponder.answer`), the same check `cadenza approve|signal|
cancel|resume` gets (run state, namespace, approvers), and the page shows the engine's
answer, a refusal included. With an `authorize` hook (the operator's, kube/access.py),
each namespace's runs are shown and steered only as the API server allows the viewer
(access.py `Permission`): a refusal is a 403 page naming the permission missing, and the
runs list leaves out, without a word, the namespaces the viewer may not list.
`/metrics` is prometheus_client's exposition of the default registry, so `cadenza dev`
needs one port for both.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
import structlog
from aiohttp import web
from cadenza.protocol import RunPhase
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from ...engine.client import DefinitionNotFound
from ...engine.control import ControlResponder
from ...engine.decide.events import GROUP_PREFIX, is_approver
from ...engine.state import RUN_ID
from ...engine.view import run_view
from . import layout
from .access import ACT, LIST, VIEW, Authorizer, Identity, Permission, cross_site_refusal
from .data import AUDIT_IDLE, MAX_LISTED, RefCache, Shown, kept_apart, matches, shown

if TYPE_CHECKING:
    from ...engine.definition import CompiledStep, CompiledWorkflow
    from ...engine.runtime import Engine
    from ...engine.state import RunState
    from ...engine.view import RunView

log = structlog.get_logger("cadenza.console")

LIVE_EVERY_MS = 1500
"""How often a page asks for its live fragment again."""
OPERATIONS = ("approve", "reject", "signal", "cancel", "resume", "retry")
LOG_LINES = 500
"""The newest log records a run page shows (per run, split by step)."""


def _templates() -> jinja2.Environment:
    folder = resources.files(__package__) / "templates"
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        autoescape=True,  # every template: run data is user data
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["secs"] = _secs
    return env


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _secs(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


@dataclass
class Console:
    """The console over one engine. `engine` is asked on every request: the operator's
    engine starts after the server does (and is None until then: the pages say so)."""

    engine: Callable[[], Engine | None]
    identity: Identity = field(default_factory=Identity)
    authorize: Authorizer | None = None
    """Asked before a namespace's runs are shown or steered; None: nothing is checked
    (`cadenza dev`, or an operator console without a user header)."""
    title: str = "Cadenza"
    refs: RefCache = field(default_factory=RefCache)
    _inputs: dict[str, tuple[str, Shown]] = field(default_factory=dict)
    _env: jinja2.Environment = field(default_factory=_templates)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.runs_page)
        app.router.add_get("/fragments/runs", self.runs_fragment)
        app.router.add_get("/runs/{namespace}/{run}", self.run_page)
        app.router.add_get("/runs/{namespace}/{run}/live", self.run_fragment)
        app.router.add_post("/runs/{namespace}/{run}/{op}", self.act)
        app.router.add_get("/diagnose/{namespace}/{workflow}", self.diagnose_page)
        if self.authorize is None:
            # Metrics name every namespace's workflows: with per-namespace access they are
            # not the console's to show (the operator serves them on its metrics port).
            app.router.add_get("/metrics", metrics)
        app.router.add_static("/static", str(resources.files(__package__) / "static"))
        return app

    # ---------------------------------------------------------------- helpers
    def _render(self, template: str, status: int = 200, **values: Any) -> web.Response:
        html = self._env.get_template(template).render(title=self.title, live_every=LIVE_EVERY_MS, **values)
        return web.Response(text=html, content_type="text/html", status=status, headers=NO_STORE)

    def _engine(self) -> Engine:
        engine = self.engine()
        if engine is None:
            raise web.HTTPServiceUnavailable(text="the engine is starting; try again in a moment")
        return engine

    # ---------------------------------------------------------- authorization
    async def _allowed(self, request: web.Request, permissions: list[Permission]) -> list[bool]:
        """Whether the viewer holds each permission (all True without `authorize`)."""
        if self.authorize is None:
            return [True] * len(permissions)
        user, _ = self.identity.viewer(request)
        if user is None:
            raise self._refusal(
                f"no user in header {self.identity.user_header}: the console is reached past its proxy"
            )
        groups = tuple(self.identity.groups(request))
        authorize = self.authorize
        try:
            return list(await asyncio.gather(*(authorize(user, groups, p) for p in permissions)))
        except Exception as exc:  # the API server unreachable or refusing the review: never guess yes
            log.warning("console access review failed", user=user, error=repr(exc))
            raise web.HTTPServiceUnavailable(
                text=f"the console could not ask the Kubernetes API whether {user} may do this: {exc}"
            ) from None

    async def _require(self, request: web.Request, verb: str, namespace: str) -> None:
        """403, naming the permission, unless the viewer holds `verb` in `namespace`."""
        permission = Permission(verb, namespace)
        (ok,) = await self._allowed(request, [permission])
        if not ok:
            user, _ = self.identity.viewer(request)
            log.info("console access refused", user=user, permission=str(permission))
            raise self._refusal(f"{user} may not {permission}", permission)

    def _refusal(self, reason: str, permission: Permission | None = None) -> web.HTTPForbidden:
        html = self._env.get_template("forbidden.html").render(
            title=self.title, reason=reason, permission=permission
        )
        return web.HTTPForbidden(text=html, content_type="text/html", headers=NO_STORE)

    # ------------------------------------------------------------------ runs
    async def _runs(self, request: web.Request) -> dict[str, Any]:
        q = request.query
        workflow, phase, namespace = q.get("workflow", ""), q.get("phase", ""), q.get("namespace", "")
        if namespace:
            await self._require(request, LIST, namespace)
        states = await self._engine().client.list()
        present = sorted({s.namespace for s in states})
        allowed = await self._allowed(request, [Permission(LIST, ns) for ns in present])
        visible = {ns for ns, ok in zip(present, allowed, strict=True) if ok}
        states = [s for s in states if s.namespace in visible]
        namespaces = sorted(visible | ({namespace} if namespace else set()))
        workflows = sorted({s.workflow for s in states if not namespace or s.namespace == namespace})
        found = sorted(
            (s for s in states if matches(s, workflow, phase, namespace)),
            key=lambda s: s.createdAt,
            reverse=True,
        )
        filters = {k: v for k, v in (("workflow", workflow), ("phase", phase), ("namespace", namespace)) if v}
        return {
            "runs": [run_view(s) for s in found[:MAX_LISTED]],
            "total": len(found),
            "filters": {"workflow": workflow, "phase": phase, "namespace": namespace},
            "query": urlencode(filters),
            "namespaces": namespaces,
            "workflows": workflows,
            "phases": [p.value for p in RunPhase],
        }

    async def runs_page(self, request: web.Request) -> web.Response:
        return self._render("runs.html", **await self._runs(request))

    async def runs_fragment(self, request: web.Request) -> web.Response:
        return self._render("runs_rows.html", **await self._runs(request))

    # ------------------------------------------------------------------- run
    async def _run(self, request: web.Request) -> dict[str, Any]:
        namespace, run = request.match_info["namespace"], request.match_info["run"]
        await self._require(request, VIEW, namespace)
        client = self._engine().client
        state = await client.get(run) if RUN_ID.match(run) else None
        if state is None or state.namespace != namespace:
            raise web.HTTPNotFound(text=f"no run {run} in namespace {namespace}")
        view = run_view(state)
        wf: CompiledWorkflow | None
        try:
            wf = await client.definition(state.definition)
        except DefinitionNotFound:
            wf = None
        logs = await self._logs(namespace, run)
        return {
            "view": view,
            "state": state,
            "logs": logs,
            "graph": layout.dag(wf, view) if wf is not None else None,
            "timeline": layout.timeline(view, time.time()),
            "steps": await self._steps(state, view, wf),
            "input": await self._value(state.input, state.inputRef, state.namespace),
            "outputs": await self._outputs(state),
            "audit": await client.audit(namespace, run, idle=AUDIT_IDLE),
            "signals": sorted(wf.signals) if wf is not None else [],
            "step_names": list(wf.order) if wf is not None else list(view.steps),
        }

    async def _logs(self, namespace: str, run: str) -> dict[str, Shown] | None:
        """What the run's handlers logged (observe/runlogs.py), by step: the newest
        LOG_LINES records, each step's cut at 64 KiB. None when they cannot be read."""
        from ..runlogs import format_record, read_logs

        try:
            records = await read_logs(self._engine().js, namespace, run, limit=LOG_LINES)
        except Exception as exc:  # no logs stream (an older server), or it is unreachable: no panel
            log.info("console could not read run logs", run=run, error=repr(exc))
            return None
        lines: dict[str, list[str]] = {}
        for record in records:
            lines.setdefault(record.step, []).append(format_record(record))
        return {step: shown("\n".join(text)) for step, text in lines.items()}

    async def _value(
        self, value: Any, ref: str | None, namespace: str, settled: bool = True, items: int = 0
    ) -> Shown:
        """A value of the record, or the one kept apart under `ref` once it is final."""
        if ref is None or not settled:
            return shown(value)
        client = self._engine().client
        return await self.refs.get(ref, lambda: kept_apart(client, ref, namespace, items))

    async def _outputs(self, state: RunState) -> Shown:
        client = self._engine().client
        if state.outputsRef is None or not state.terminal:
            return shown(state.outputs)
        return await self.refs.get(state.outputsRef, lambda: client.outputs(state))

    async def _steps(
        self, state: RunState, view: RunView, wf: CompiledWorkflow | None
    ) -> list[dict[str, Any]]:
        names = list(wf.order) if wf is not None else []
        if wf is not None and wf.on_exit is not None:
            names.append(wf.on_exit.name)
        names += [n for n in view.steps if n not in names]
        steps = []
        for name in names:
            sv = view.steps.get(name)
            cs = (
                (wf.on_exit if wf.on_exit is not None and wf.on_exit.name == name else wf.steps.get(name))
                if wf
                else None
            )
            label, value = await self._input(state, wf, name)
            steps.append(
                {
                    "name": name,
                    "view": sv,
                    "kind": _kind(cs),
                    "input_label": label,
                    "input": value,
                    "output": await self._value(
                        sv.output,
                        sv.output_ref,
                        state.namespace,
                        sv.terminal,
                        sv.items.total if sv.items else 0,
                    )
                    if sv is not None
                    else shown(None),
                    "error": shown(sv.error) if sv is not None else shown(None),
                }
            )
        return steps

    async def _input(self, state: RunState, wf: CompiledWorkflow | None, name: str) -> tuple[str, Shown]:
        """The step's input, re-rendered (observe/step_input.py). One the newest attempt
        received is kept by (run, step, attempt, hash): the live fragment asks every few
        seconds, and it cannot change."""
        from ..step_input import Rendering, step_input

        if wf is None:
            return "input", shown(None)
        st = state.steps.get(name)
        last = st.attempts[-1] if st is not None and st.attempts else None
        key = f"input:{state.run}:{name}:{last.n}:{last.inputHash}" if last is not None else ""
        if key in self._inputs:
            return self._inputs[key]
        found = await step_input(self._engine().client, state, wf, name)
        if found is None:
            return "input", shown(None)
        result = (found.label, shown(found.value))
        if found.shown is Rendering.RENDERED and key:
            self._inputs[key] = result
            while len(self._inputs) > self.refs.size:
                self._inputs.pop(next(iter(self._inputs)))
        return result

    async def run_page(self, request: web.Request) -> web.Response:
        values = await self._run(request)
        return self._render(
            "run.html",
            notice=request.query.get("notice", ""),
            retry_key=uuid.uuid4().hex,
            refused=request.query.get("ok") == "0",
            **values,
        )

    async def run_fragment(self, request: web.Request) -> web.Response:
        return self._render("run_live.html", **await self._run(request))

    # ---------------------------------------------------------------- actions
    async def act(self, request: web.Request) -> web.Response:
        namespace, run, op = (request.match_info[k] for k in ("namespace", "run", "op"))
        refusal = cross_site_refusal(request)
        if refusal is not None:
            log.warning("console action refused", op=op, run=run, reason=refusal)
            raise web.HTTPForbidden(text=refusal)
        if op not in OPERATIONS:
            raise web.HTTPNotFound(text=f"no action {op}")
        by, verified = self.identity.viewer(request)
        if by is None:
            raise web.HTTPForbidden(
                text=f"no user in header {self.identity.user_header}: the console is reached past its proxy"
            )
        await self._require(request, ACT, namespace)
        form = await request.post()
        try:
            command = _command(op, run, form)
        except ValueError as exc:
            return _back(namespace, run, str(exc), ok=False)
        command["by"] = by
        if not verified:
            command["comment"] = " ".join(filter(None, ["[console, unverified]", command.get("comment")]))
        reply = await ControlResponder(self._engine()).answer({**command, "namespace": namespace})
        groups = self.identity.groups(request)
        if not reply.get("ok") and command["op"] == "approve" and groups:
            reply = await self._as_member(command, namespace, groups, reply)
        log.info("console action", op=op, run=run, namespace=namespace, by=by, ok=reply.get("ok"))
        text = str(reply.get("message") or reply.get("error") or "")
        new = reply.get("newRun")
        return _back(namespace, new if isinstance(new, str) else run, text, ok=bool(reply.get("ok")))

    async def _as_member(
        self, command: dict[str, Any], namespace: str, groups: list[str], reply: dict[str, Any]
    ) -> dict[str, Any]:
        """An approval the engine refused only because the user is not among the step's
        approvers by name, while the proxy vouches for a group that is: sent as
        `USER [group:NAME]`, the form the engine accepts from the operator. Every other
        refusal (not waiting, finished, another namespace) stands as the engine gave it."""
        client = self._engine().client
        run, step, user = command["run"], command["step"], command["by"]
        state = await client.get(run)
        if state is None or state.namespace != namespace:
            return reply
        cs = (await client.definition(state.definition)).steps.get(step)
        approval = cs.approval if cs is not None else None
        if approval is None:
            return reply
        by_name = f"refused: {user} is not an approver of {step} (approvers: {', '.join(approval.approvers)})"
        if reply.get("error") != by_name:
            return reply
        for group in groups:
            member = f"{user} [{GROUP_PREFIX}{group}]"
            if is_approver(approval.approvers, member):
                approved = bool(command["approved"])
                await client.approve(
                    namespace, run, step, approved, by=member, comment=command.get("comment")
                )
                verb = "approved" if approved else "rejected"
                return {"ok": True, "message": f"{verb} {run}/{step} as {user} (group {group})"}
        return reply

    # --------------------------------------------------------------- diagnose
    async def diagnose_page(self, request: web.Request) -> web.Response:
        """`cadenza diagnose` for one workflow, as a page (observe/diagnose.py)."""
        from ...models import parse_duration
        from ..diagnose import UnknownWorkflow, diagnose

        namespace, workflow = request.match_info["namespace"], request.match_info["workflow"]
        await self._require(request, LIST, namespace)
        since_text = request.query.get("since", "1h")
        try:
            since = parse_duration(since_text)
            if not since > 0:
                raise ValueError("the window must be longer than 0s")
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"since: {exc}") from None
        try:
            report = await diagnose(self._engine().client, namespace, workflow, since)
        except UnknownWorkflow as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        return self._render(
            "diagnose.html",
            report=report.to_dict(),
            namespace=namespace,
            workflow=workflow,
            since=since_text,
        )


def _kind(cs: CompiledStep | None) -> str:
    if cs is None:
        return ""
    return f"agent {cs.agent}" if cs.agent else cs.kind


def _step_def(wf: CompiledWorkflow, name: str) -> CompiledStep | None:
    if wf.on_exit is not None and wf.on_exit.name == name:
        return wf.on_exit
    return wf.steps.get(name)


def _command(op: str, run: str, form: Any) -> dict[str, Any]:
    """The control request for a form; ValueError naming the field when it is bad."""
    comment = str(form.get("comment", "")).strip() or None
    if op in ("approve", "reject"):
        step = str(form.get("step", "")).strip()
        if not step:
            raise ValueError(f"{op}: the form names no step")
        return {"op": "approve", "run": run, "step": step, "approved": op == "approve", "comment": comment}
    if op == "signal":
        name = str(form.get("name", "")).strip()
        if not name:
            raise ValueError("signal: name is empty")
        raw = str(form.get("payload", "")).strip()
        try:
            payload = json.loads(raw) if raw else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"signal {name}: payload is not JSON ({exc.msg} at line {exc.lineno})") from None
        return {"op": "signal", "run": run, "name": name, "payload": payload}
    if op == "resume":
        budget: dict[str, Any] = {}
        for name, kind in (("tokens", int), ("cost", float)):
            raw = str(form.get(name, "")).strip()
            if raw:
                try:
                    value = kind(raw)
                except ValueError:
                    raise ValueError(f"resume: {name} {raw!r} is not a number") from None
                if value < 0:
                    raise ValueError(f"resume: {name} must not be negative")
                budget[name] = value
        return {"op": "resume", "run": run, **budget}
    if op == "retry":
        # The page's key: the same form posted twice starts one run, a new page view another.
        start, key = str(form.get("from", "")).strip(), str(form.get("key", "")).strip()
        return {
            "op": "retry",
            "run": run,
            **({"from": start} if start else {}),
            **({"key": key} if key else {}),
        }
    if op == "cancel":
        return {
            "op": "cancel",
            "run": run,
            "reason": str(form.get("reason", "")).strip() or "from the console",
        }
    return {"op": op, "run": run}


def _back(namespace: str, run: str, notice: str, *, ok: bool) -> web.Response:
    """After an action, back to the run page (Post/Redirect/Get) with the engine's answer."""
    query = urlencode({"notice": notice, "ok": "1" if ok else "0"})
    raise web.HTTPSeeOther(location=f"/runs/{namespace}/{run}?{query}")


NO_STORE = {"Cache-Control": "no-store"}


async def metrics(_: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(console: Console, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0: any free port); the runner (to `cleanup`) and the port bound.
    OSError when the port cannot be had."""
    runner = web.AppRunner(console.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)
