"""The `cadenza` command line.

Exit codes: 0 the run Succeeded (or the command worked); 1 the run Failed or was
Cancelled, or a command was refused (an unknown or finished run, a step not waiting);
2 invalid manifests or input, with a message naming file, object and field, or a RUN that
names no run (neither a run id nor, with a kubeconfig, a WorkflowRun: `resolve_run`);
3 NATS could not be reached (`cannot reach NATS at URL: reason`, after one bounded attempt),
or no engine answered a command that needs one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from .engine.infra import nats_options

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
EXIT_UNREACHABLE = 3  # distinct from 1, so a script can tell a down NATS from a failed run
METRICS_HELP = (
    "serve Prometheus metrics on 127.0.0.1:PORT (0: any free port, printed at start); "
    "none unless asked. A port that is taken: exit 2"
)
SECURE_HELP = (
    "run the embedded NATS in operator mode (JWT + nkeys), as the chart does: the engine, "
    "each Agent and the CLI user get their own credential (docs/security.md); not with --nats"
)
CONTROL_WAIT = 5.0
"""Seconds approve, signal and cancel wait for an engine's answer before exit 3."""
DIAGNOSE_WAIT = 60.0
"""Seconds `cadenza diagnose` under a client credential waits for an engine's report (it
may read thousands of runs)."""
CONTROL_HELP = (
    "A running engine checks the command against the run and answers: exit 0 when it was "
    "applied, 1 when it was refused (unknown or finished run, step not waiting, decider not "
    "an approver: nothing is sent), 3 when NATS cannot be reached or no engine answers "
    "within --wait seconds."
)


def _parse_input(raw: str | None, paths: list[str]) -> Any:
    """--input JSON or @FILE (relative to the working directory, else to the first PATH); default {}."""
    if raw is None:
        return {}
    if raw.startswith("@"):
        name = Path(raw[1:])
        candidates = [name] + ([Path(paths[0]) / name] if paths and Path(paths[0]).is_dir() else [])
        for candidate in candidates:
            if candidate.is_file():
                try:
                    text = candidate.read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{candidate}: input: cannot read it as UTF-8 text: {exc}") from None
                return _parse_json(text, f"{candidate}: input")
        raise ValueError(f"--input: no such file {raw[1:]!r}")
    return _parse_json(raw, "--input")


def _parse_json(text: str, what: str) -> Any:
    """JSON from the command line or a file, nested no deeper than a run can carry."""
    from .models import nesting_error

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: invalid JSON: {exc}") from None
    except RecursionError:  # json recurses per level: 100,000 levels exhaust the stack
        raise ValueError(f"{what}: nested too deeply to parse") from None
    error = nesting_error(value)
    if error is not None:
        raise ValueError(f"{what}: {error}")
    return value


def _load(paths: list[str], err: Console) -> Any:  # -> Bundle | None
    from .manifests import InvalidManifests, load

    try:
        return load(list(paths))
    except InvalidManifests as exc:
        for e in exc.errors:
            # Escaped: the message quotes the manifest (`agent: "[/x]"`, a pattern `[a-z]`),
            # which rich would take for markup and fail on or swallow.
            err.print(f"[red]error[/red]: {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
        return None


def _hosting_engine(args: argparse.Namespace) -> None:
    """This process is about to spend its life hosting an engine: tune the garbage
    collector for it (engine.host.tune_gc), after the command's imports. Only when the
    command is the process (`cadenza ...`), not a call of `main` from other code."""
    if getattr(args, "own_process", False):
        from .engine.host import tune_gc

        tune_gc()


def cmd_validate(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    bundle = _load(args.paths, err)
    if bundle is None:
        return EXIT_INVALID
    print(f"ok: {len(bundle.agents)} agent(s), {len(bundle.workflows)} workflow(s) valid")
    return EXIT_OK


def _references_resolve(env_file: str | None, agents: list[Any], err: Console, bundle: Any = None) -> bool:
    """Read --env-file, then check that every Secret and ConfigMap reference of `agents`
    (and the API keys of their Models) resolves before anything starts; otherwise print
    which variable is missing."""
    from .local.model_env import model_environment
    from .local.secrets import add_env_file, referenced_environment

    models = {name: model for name, (model, _) in bundle.models.items()} if bundle else {}
    try:
        add_env_file(env_file)
        for agent in agents:
            referenced_environment(agent, os.environ)
            model_environment(agent, models, os.environ)
    except ValueError as exc:  # MissingReference too: names the Agent and the variable
        err.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return False
    return True


def _pick_workflow(bundle: Any, name: str | None, err: Console) -> Any:
    if name:
        if name not in bundle.compiled:
            found = ", ".join(sorted(bundle.compiled)) or "none"
            err.print(f"[red]error[/red]: no Workflow named {escape(repr(name))} (found: {found})")
            return None
        return bundle.compiled[name]
    if len(bundle.compiled) == 1:
        return next(iter(bundle.compiled.values()))
    # Several workflows: the one no other workflow uses as a sub-workflow, if unique.
    used = {s.workflow for wf in bundle.compiled.values() for s in wf.steps.values() if s.workflow}
    roots = [wf for n, wf in bundle.compiled.items() if n not in used]
    if len(roots) == 1:
        return roots[0]
    names = ", ".join(sorted(bundle.compiled)) or "none"
    err.print(f"[red]error[/red]: choose a workflow with --workflow (found: {names})")
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from .engine.inputs import InputError, validate_input
    from .local.progress import Progress, agent_steps, step_table
    from .local.runner import (
        SUMMARY_OUTPUT_BYTES,
        MetricsPortError,
        RunOptions,
        agents_needed,
        dump_json,
        execute,
    )
    from .local.supervision import Interrupted, until_signalled

    err = Console(stderr=True)
    bundle = _load(args.paths, err)
    if bundle is None:
        return EXIT_INVALID
    wf = _pick_workflow(bundle, args.workflow, err)
    if wf is None:
        return EXIT_INVALID
    needed = [bundle.agents[name][0] for name in sorted(agents_needed(bundle, wf)) if name in bundle.agents]
    if not _references_resolve(args.env_file, needed, err, bundle):
        return EXIT_INVALID
    try:
        value = _parse_input(args.input, args.paths)
        validate_input(wf, value)
    except (ValueError, InputError) as exc:
        err.print(
            f"[red]error[/red]: Workflow/{wf.name}: {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        return EXIT_INVALID
    signals: dict[str, Any] = {}
    for raw in args.signal:
        name, _, payload = raw.partition("=")
        try:
            signals[name] = _parse_json(payload, f"--signal {name}") if payload else None
        except ValueError as exc:
            err.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False)
            return EXIT_INVALID
    for name in [*args.approve, *args.reject]:
        if name not in wf.steps or wf.steps[name].kind != "approval":
            err.print(
                f"[red]error[/red]: Workflow/{wf.name}: --approve/--reject {escape(repr(name))}: "
                "not an approval step"
            )
            return EXIT_INVALID
    tty = sys.stderr.isatty()
    opts = RunOptions(
        workflow=wf,
        bundle=bundle,
        input=value,
        approve=args.approve,
        reject=args.reject,
        nats_url=args.nats,
        timeout=args.timeout,
        metrics_port=args.metrics_port,
        interactive=sys.stdin.isatty() and tty,
        approver=args.by,
        signals=signals,
        secure=args.secure,
    )
    progress = Progress(err, wf.name, agent_steps(wf)) if tty else None
    _hosting_engine(args)
    # SIGTERM, SIGINT and SIGHUP stop the run: agents and the embedded server go with it.
    try:
        if progress is not None:
            with progress:
                summary, code = asyncio.run(until_signalled(execute(opts, progress)))
        else:
            summary, code = asyncio.run(until_signalled(execute(opts, None)))
    except MetricsPortError as exc:
        err.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_INVALID
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        err.print(f"[yellow]interrupted[/yellow] ({signal.Signals(signum).name}): agents and server stopped")
        return 128 + signum
    if args.output == "json":
        print(dump_json(summary))
    else:
        from .engine.state import RunState  # noqa: F401 - for the summary table

        out = Console()
        state = progress.state if progress is not None else None
        if state is not None:
            out.print(step_table(state, f"{wf.name} {summary['run']}"))
        else:
            for name, st in summary["steps"].items():
                out.print(f"  {name:<24} {st['phase']:<16} attempts={st['attempts']}", highlight=False)
        color = "green" if summary["phase"] == "Succeeded" else "red"
        duration = summary.get("durationSeconds")
        out.print(
            f"[bold {color}]{summary['phase']}[/bold {color}] run {summary['run']}"
            + (f" in {duration:.2f}s" if duration else "")
            + (f": {summary['message']}" if summary.get("message") else "")
        )
        shown = json.dumps(summary["outputs"], indent=2, default=str)
        if len(shown) > SUMMARY_OUTPUT_BYTES:  # megabytes are for --output json, not a terminal
            shown = f"{len(shown):,} bytes of JSON, not shown here (--output json prints them)"
        out.print("outputs: " + shown, highlight=False)
        if code != EXIT_OK and summary.get("agentLogs"):
            err.print(summary["agentLogs"], highlight=False, markup=False)
    return code


async def _with_nc(url: str, fn: Any) -> None:
    from cadenza.nats import connect_once

    nc = await connect_once(url, **nats_options())
    try:
        await fn(nc)
    finally:
        await nc.close()


async def _with_js(url: str, fn: Any) -> None:
    await _with_nc(url, lambda nc: fn(nc.jetstream()))


async def _ask_engine(
    url: str, namespace: str, request: dict[str, Any], wait: float
) -> dict[str, Any] | None:
    """An engine's answer to a control request (see engine/control.py), or None when no
    engine answers within `wait` seconds."""
    from cadenza.nats import connect_once

    from .engine.client import RunClient

    nc = await connect_once(url, **nats_options())
    try:
        return await RunClient(nc).request(namespace, request, wait, user=_credential_user())
    finally:
        await nc.close()


def _credential_user() -> str | None:
    """The user name in the credential we connect with ($CADENZA_NATS_CREDS, or --creds):
    a client credential may send control requests only on its user's subject."""
    path = os.environ.get("CADENZA_NATS_CREDS")
    if not path:
        return None
    import re

    from cadenza.nats import credential_claims

    name = (credential_claims(path) or {}).get("name")  # not a .creds file of ours: no user
    # one subject token, as client_permissions puts it in cadenza.control.<ns>.<user>
    return name if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]+", name) else None


def _control(args: argparse.Namespace, request: dict[str, Any]) -> int:
    """Ask an engine to apply a command to a run; say what happened. Exit 0 when it was
    applied, 1 when refused (unknown or finished run, step not waiting, not an approver),
    3 when no engine answers."""
    err = Console(stderr=True)
    if not args.wait > 0:  # also NaN
        err.print(f"[red]error[/red]: --wait: {args.wait:g} is not a number of seconds above 0")
        return EXIT_INVALID
    args.run = resolve_run(args)  # after the command's own checks of its arguments
    reply = asyncio.run(_ask_engine(args.nats, args.namespace, {**request, "run": args.run}, args.wait))
    if reply is None:
        err.print(
            f"[red]error[/red]: no engine answered on NATS {escape(args.nats)} within {args.wait:g}s; "
            "is an engine running?",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_UNREACHABLE
    if not reply.get("ok"):
        err.print(f"[red]error[/red]: {escape(str(reply.get('error')))}", highlight=False, soft_wrap=True)
        return EXIT_FAILED
    print(reply.get("message") or "done")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _control(
        args,
        {
            "op": "approve",
            "step": args.step,
            "approved": not args.reject,
            "by": args.by,
            "comment": args.comment,
        },
    )


def cmd_signal(args: argparse.Namespace) -> int:
    try:
        payload = _parse_json(args.payload, "--payload") if args.payload else None
    except ValueError as exc:
        Console(stderr=True).print(f"[red]error[/red]: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_INVALID
    return _control(args, {"op": "signal", "name": args.name, "payload": payload, "by": args.by})


def cmd_cancel(args: argparse.Namespace) -> int:
    return _control(args, {"op": "cancel", "by": args.by, "reason": args.reason})


def cmd_resume(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    if args.tokens is not None and args.tokens <= 0:
        err.print(f"[red]error[/red]: --tokens: {args.tokens} is not a number of tokens above 0")
        return EXIT_INVALID
    if args.cost is not None and not args.cost > 0:  # also NaN
        err.print(f"[red]error[/red]: --cost: {args.cost:g} is not a cost above 0")
        return EXIT_INVALID
    return _control(args, {"op": "resume", "by": args.by, "tokens": args.tokens, "cost": args.cost})


def cmd_audit(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from .engine.client import RunClient

    records: list[dict[str, Any]] = []
    found: list[str | None] = []

    async def read(nc: Any) -> None:
        client = await RunClient(nc).open()
        records.extend(await client.audit(args.namespace, args.run))
        if not records and args.run != ">":
            state = await client.get(args.run)  # no record: does the run exist, and where?
            found.append(state.namespace if state is not None else None)

    asyncio.run(_with_nc(args.nats, read))
    if found:  # no record: say whether the run exists at all, and where
        where = found[0]
        elsewhere = f" (run {args.run} is in namespace {where})" if where and where != args.namespace else ""
        if where != args.namespace:
            print(f"error: no run {args.run} in namespace {args.namespace}{elsewhere}", file=sys.stderr)
            return EXIT_FAILED
    if args.output == "json":
        print(json.dumps(records, indent=2, default=str))
        return EXIT_OK
    for r in records:
        when = datetime.fromtimestamp(r["at"], UTC).strftime("%H:%M:%S.%f")[:-3]
        change = f"{r['from']} -> {r['to']}" if r.get("from") != r.get("to") else (r.get("to") or "")
        print(
            f"{r['seq']:>4} {when} {r['run']} {r.get('step') or '-':<20} {change:<30} {r['reason']} "
            f"[{r['event']} by {r['actor']}]"
        )
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """What the run's handlers logged through task.log (observe/runlogs.py)."""
    from .observe.runlogs import LogsRequestError, show_logs

    def write(line: str) -> None:
        # plain writes: user data is never read as rich markup, nor wrapped when piped
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    shown: list[int] = []

    async def show(js: Any) -> None:
        shown.append(
            await show_logs(
                js,
                args.namespace,
                args.run,
                args.step,
                args.attempt,
                follow=args.follow,
                output=args.output,
                write=write,
            )
        )

    try:
        asyncio.run(_with_js(args.nats, show))
    except LogsRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    if shown == [0]:  # on stderr: stdout stays the records alone
        what = f"step {args.step} of run {args.run}" if args.step else f"run {args.run}"
        print(f"no lines logged through task.log by {what} (kept {_LOGS_KEPT})", file=sys.stderr)
    return EXIT_OK


_LOGS_KEPT = "72h and 512 MiB by default: CADENZA_LOGS_MAX_AGE, CADENZA_LOGS_MAX_BYTES"


class UnknownRun(ValueError):
    """A RUN argument that names no run: neither a run id the runs bucket holds nor, with a
    kubeconfig, a WorkflowRun whose run was started (exit 2, like any bad argument)."""


def resolve_run(args: argparse.Namespace) -> str:
    """The run id a command's RUN argument means: the id itself when the engine's runs
    bucket holds it, else (a kubeconfig configured: --kubeconfig, $KUBECONFIG or
    ~/.kube/config) the run of the WorkflowRun of that name in --namespace. Every command
    taking RUN goes through here (main() calls it; _control and retry, once their own
    arguments are checked); UnknownRun otherwise."""
    from nats.js.errors import BucketNotFoundError

    from .engine.client import RunClient
    from .kube.lookup import LookupFailed, configured_kubeconfig, workflowrun_run_id

    run, namespace = args.run, args.namespace
    if run == ">" or getattr(args, "resolved", None) == run:  # audit's every run; done already
        return str(run)
    known: list[bool] = []

    async def look(nc: Any) -> None:
        try:
            known.append(await (await RunClient(nc).open()).get(run) is not None)
        except BucketNotFoundError:  # no engine ever ran on this bus: the command says what is wrong
            known.append(True)

    asyncio.run(_with_nc(args.nats, look))
    if known and known[0]:
        args.resolved = run
        return str(run)
    kubeconfig = configured_kubeconfig(getattr(args, "kubeconfig", None))
    if kubeconfig is None:
        raise UnknownRun(
            f"no run {run} in namespace {namespace}: the engine holds no run of that id (to look "
            "up a WorkflowRun of that name, configure a kubeconfig: --kubeconfig, $KUBECONFIG "
            "or ~/.kube/config)"
        )
    try:
        found = asyncio.run(workflowrun_run_id(kubeconfig, namespace, run))
    except LookupFailed as exc:
        raise UnknownRun(f"no run {run}, and no WorkflowRun could be looked up: {exc}") from None
    if found is None:
        raise UnknownRun(f"no run {run} in namespace {namespace}: neither a run id nor a started WorkflowRun")
    args.resolved = found
    return found


def _read_runs(args: argparse.Namespace, fn: Any) -> None:
    """Run `fn(client)` on an opened RunClient; not at all when no engine has made the
    buckets yet (a bus with no runs: the caller finds none)."""
    from nats.js.errors import BucketNotFoundError

    from .engine.client import RunClient

    async def go(nc: Any) -> None:
        try:
            client = await RunClient(nc).open()
        except BucketNotFoundError:
            return
        await fn(client)

    asyncio.run(_with_nc(args.nats, go))


def cmd_list(args: argparse.Namespace) -> int:
    import time

    from nats.errors import TimeoutError as NatsTimeout

    from .engine.control import MAX_LISTED
    from .engine.view import RunFilter, run_view, summary
    from .observe.listing import parse_since, run_table
    from .observe.terminal import show

    if args.limit < 1:
        print(f"error: --limit {args.limit}: not a number of runs above 0", file=sys.stderr)
        return EXIT_INVALID
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    now = time.time()
    wanted = RunFilter(workflow=args.workflow, phase=args.phase, since=since)
    namespace = None if args.all_namespaces else args.namespace
    rows: list[dict[str, Any]] = []
    if _credential_user() is not None:
        # A client credential reads runs by id only (no consumer on the runs bucket): an
        # engine lists them, those of the namespace the credential may send requests for.
        if namespace is None:
            print("error: -A: a client credential lists the runs of its namespace only (-n)", file=sys.stderr)
            return EXIT_INVALID
        request = {"op": "list", "workflow": args.workflow, "phase": args.phase, "since": since}
        reply = asyncio.run(_ask_engine(args.nats, namespace, {**request, "limit": args.limit}, CONTROL_WAIT))
        if reply is None:
            print(f"error: no engine answered on NATS {args.nats}; is an engine running?", file=sys.stderr)
            return EXIT_UNREACHABLE
        if not reply.get("ok"):
            print(f"error: {reply.get('error')}", file=sys.stderr)
            return EXIT_FAILED
        rows = list(reply.get("runs") or [])
        if args.limit > MAX_LISTED and len(rows) >= MAX_LISTED:
            print(
                f"note: an engine lists at most {MAX_LISTED} runs for a client credential (one "
                "message); narrow the list with --workflow, --phase or --since",
                file=sys.stderr,
            )
    else:

        async def read(client: Any) -> None:
            states = await client.recent(namespace, args.limit, lambda s: wanted.keeps(s, now))
            rows.extend(summary(run_view(s), now) for s in states)

        try:
            _read_runs(args, read)
        except NatsTimeout:
            print(
                "error: cadenza list reads every run record through a consumer on the runs bucket "
                "(KV_cadenza_runs), which this credential may not create; a client credential "
                "(one minted by nats-auth mint-client) asks an engine instead",
                file=sys.stderr,
            )
            return EXIT_UNREACHABLE
    if args.output == "json":
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    if not rows:
        where = "any namespace" if args.all_namespaces else f"namespace {args.namespace}"
        print(f"no runs in {where}", file=sys.stderr)
        return EXIT_OK
    show(run_table(rows, wide=args.output == "wide", namespaces=args.all_namespaces, now=now))
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    import time

    from .engine.view import run_view
    from .observe.terminal import show
    from .observe.tree import run_tree

    if args.watch:
        return _watch_get(args)
    found: list[Any] = []

    inputs: dict[str, Any] = {}

    async def read(client: Any) -> None:
        state = await client.get(args.run)
        if state is not None:
            found.extend([state, await client.outputs(state) if args.output == "json" else None])
            if state.namespace == args.namespace:  # each step's input: in the JSON and the tree
                inputs.update(await _step_inputs(client, state))

    _read_runs(args, read)
    if not found or found[0].namespace != args.namespace:
        where = f" (run {args.run} is in namespace {found[0].namespace})" if found else ""
        print(f"error: no run {args.run} in namespace {args.namespace}{where}", file=sys.stderr)
        return EXIT_INVALID
    state, outputs = found
    view = run_view(state)
    if args.output == "json":
        print(json.dumps(_get_document(view, inputs, outputs), indent=2, default=str))
    else:
        show(run_tree(view, now=time.time(), inputs=inputs))
    return EXIT_OK


def _get_document(view: Any, inputs: dict[str, Any], outputs: Any) -> dict[str, Any]:
    """`get -o json`'s document: the run's view, each step with its input, the outputs."""
    from .engine.view import document

    doc = document(view)
    for name, entry in doc["steps"].items():
        if name in inputs:
            entry["input"] = inputs[name]
    return {**doc, "outputs": outputs}


def _watch_get(args: argparse.Namespace) -> int:
    """`get --watch`: each new state of the run (observe/watch.py) until it ends, redrawn in
    place on a terminal; piped, a tree per state a blank line apart, or one JSON document
    a line (-o json). A client credential may not watch the runs bucket: it polls."""
    import contextlib
    import time

    from .engine.view import run_view
    from .observe.terminal import show
    from .observe.tree import run_tree
    from .observe.watch import LiveTree, RunRemoved, run_records

    seen: list[str] = []  # the namespace of each state shown
    screen = contextlib.ExitStack()
    live: list[LiveTree] = []

    async def follow(client: Any) -> None:
        records = run_records(client.kv, args.run, poll=_credential_user() is not None)
        async with contextlib.aclosing(records):  # its watch stopped before the connection closes
            async for state in records:
                if state.namespace != args.namespace:
                    seen.append(state.namespace)
                    return
                inputs, view = await _step_inputs(client, state), run_view(state)
                if args.output == "json":
                    doc = _get_document(view, inputs, await client.outputs(state))
                    print(json.dumps(doc, default=str), flush=True)
                elif sys.stdout.isatty():
                    if not live:
                        live.append(screen.enter_context(LiveTree()))
                    live[0].show(view, inputs)
                else:
                    print("\n" if seen else "", end="")
                    show(run_tree(view, now=time.time(), inputs=inputs))
                    sys.stdout.flush()
                seen.append(state.namespace)

    try:
        with screen:
            _read_runs(args, follow)
    except KeyboardInterrupt:
        return 130
    except RunRemoved as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not seen or seen[0] != args.namespace:
        where = f" (run {args.run} is in namespace {seen[0]})" if seen else ""
        print(f"error: no run {args.run} in namespace {args.namespace}{where}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


async def _step_inputs(client: Any, state: Any) -> dict[str, Any]:
    """Each recorded step's input, re-rendered (observe/step_input.py), by step; none when
    the run's definition cannot be read (a credential that may not, or it is gone)."""
    from nats.errors import Error as NatsError

    from .engine.client import DefinitionNotFound
    from .observe.step_input import step_input

    inputs = {}
    try:
        wf = await client.definition(state.definition)
        for name in state.steps:
            found = await step_input(client, state, wf, name)
            if found is not None:
                inputs[name] = found.document()
    except (DefinitionNotFound, NatsError):
        pass  # the document without (the rest of) the inputs: they are an aid, not the record
    return inputs


def cmd_retry(args: argparse.Namespace) -> int:
    import uuid

    args.run = resolve_run(args)
    if args.from_step is not None:  # a bad --from is a bad argument (exit 2), not a refusal
        steps: list[str] = []

        async def read(client: Any) -> None:
            state = await client.get(args.run)
            if state is not None and state.namespace == args.namespace:
                steps.extend((await client.definition(state.definition)).order)

        _read_runs(args, read)
        if steps and args.from_step not in steps:
            print(
                f"error: --from {args.from_step}: run {args.run} has no such step "
                f"(steps: {', '.join(steps)})",
                file=sys.stderr,
            )
            return EXIT_INVALID
    request = {"op": "retry", "by": args.by, "from": args.from_step, "key": uuid.uuid4().hex}
    return _control(args, request)


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Waiting vs executing, retries and load, non-determinism and audit volume over the
    workflow's recent runs (observe/diagnose.py). Exit 2 for an unknown workflow or a bad
    --since; no runs in the window is a report (exit 0)."""
    from .engine.client import RunClient
    from .models import parse_duration
    from .observe.diagnose import UnknownWorkflow, diagnose, renderable, report_from_answer
    from .observe.terminal import show

    err = Console(stderr=True)
    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        err.print(f"[red]error[/red]: --since: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_INVALID
    if not since > 0:
        err.print("[red]error[/red]: --since: the window must be longer than 0s", highlight=False)
        return EXIT_INVALID
    reports: list[Any] = []

    async def read(nc: Any) -> None:
        client = await RunClient(nc).open()
        reports.append(await diagnose(client, args.namespace, args.workflow, since))

    if _credential_user() is not None:
        # A client credential reads no run records in bulk and no audit stream: an engine
        # makes the report, over the namespace the credential may send requests for.
        request = {"op": "diagnose", "workflow": args.workflow, "since": since}
        reply = asyncio.run(_ask_engine(args.nats, args.namespace, request, DIAGNOSE_WAIT))
        if reply is None:
            err.print(
                f"[red]error[/red]: no engine answered on NATS {escape(args.nats)} within {DIAGNOSE_WAIT:g}s"
            )
            return EXIT_UNREACHABLE
        if not reply.get("ok"):
            err.print(f"[red]error[/red]: {escape(str(reply.get('error')))}", highlight=False, soft_wrap=True)
            return EXIT_INVALID if reply.get("unknownWorkflow") else EXIT_FAILED
        try:
            reports.append(report_from_answer(reply.get("report")))
        except ValueError as exc:
            bad = f"engine {reply.get('engine')} answered with no report I can read: {exc}"
            err.print(f"[red]error[/red]: {escape(bad)}", highlight=False, soft_wrap=True)
            return EXIT_FAILED
    else:
        try:
            asyncio.run(_with_nc(args.nats, read))
        except UnknownWorkflow as exc:
            err.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False, soft_wrap=True)
            return EXIT_INVALID
    if args.output == "json":
        print(json.dumps(reports[0].to_dict(), indent=2))
    else:
        show(renderable(reports[0]))
    return EXIT_OK


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from .engine.deadletters import read_dead_letters

    records: list[dict[str, Any]] = []

    async def read(js: Any) -> None:
        records.extend(await read_dead_letters(js, args.limit))

    asyncio.run(_with_js(args.nats, read))
    if args.output == "json":
        print(json.dumps(records, indent=2))
        return EXIT_OK
    if not records:
        print("no dead letters")
    for r in records:
        body = r["data"] if r["data"] is not None else f"<{r['size']} bytes, binary>"
        preview = body if len(body) <= 80 else body[:77] + "..."
        print(
            f"{r['seq']:>6} {r['source']:<16} {r['subject']}  deliveries={r['deliveries']}\n"
            f"       reason: {r['reason']}\n       data: {preview}"
        )
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    from .local.dev import publish

    try:
        payload = _parse_json(args.payload, "payload")
    except ValueError as exc:
        Console(stderr=True).print(f"[red]error[/red]: {escape(str(exc))}", highlight=False)
        return EXIT_INVALID
    asyncio.run(publish(args.nats, args.subject, payload))
    print(f"published to {args.subject}")
    return EXIT_OK


def cmd_engine(args: argparse.Namespace) -> int:
    import socket

    from .engine.serve import serve
    from .engine.settings import EngineSettings, SettingsError
    from .observe.diagnose import ENGINE_OPERATIONS

    # Options win over the environment; the rest comes from it (CADENZA_ENGINE_*, ...).
    given = {"nats_url": args.nats, "nats_creds": args.creds, "name": args.name}
    try:
        settings = EngineSettings(**{k: v for k, v in given.items() if v})
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if not args.name and "name" not in settings.model_fields_set:
        settings.name = f"engine-{socket.gethostname()}-{os.getpid()}"
    _hosting_engine(args)
    asyncio.run(serve(settings, ENGINE_OPERATIONS))
    return EXIT_OK


def cmd_crds(args: argparse.Namespace) -> int:
    from .crds import write_crds

    for path in write_crds(
        Path(args.output_dir),
        chart_dir=None if args.output_dir != "crds" else Path("charts/cadenza/files/crds"),
    ):
        print(path)
    return EXIT_OK


def cmd_nats_auth_init(args: argparse.Namespace) -> int:
    """The chart's install hook: the bus's keys Secret, created once (kube/nats_credentials)."""
    import aiohttp
    from kubernetes.config import ConfigException

    from .kube.api import ApiError, KubeApi
    from .kube.nats_credentials import init_auth_secret

    try:
        api = KubeApi.from_environment()
    except ConfigException as exc:
        print(f"error: no Kubernetes credentials (in-cluster or $KUBECONFIG): {exc}", file=sys.stderr)
        return EXIT_INVALID

    async def init() -> bool:
        try:
            return await init_auth_secret(api, args.namespace, args.secret)
        finally:
            await api.close()

    try:
        created = asyncio.run(init())
    except ApiError as exc:
        print(f"error: Secret {args.namespace}/{args.secret}: {exc.status} {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except aiohttp.ClientError as exc:
        print(f"error: the Kubernetes API is unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"Secret {args.namespace}/{args.secret} {'created' if created else 'exists: keys kept'}")
    return EXIT_OK


def cmd_nats_auth_mint_client(args: argparse.Namespace) -> int:
    """A CLI (client) credential for one user of one namespace, minted with the account
    seed in the chart's keys Secret (keys.json): control requests only on
    cadenza.control.<namespace>.<user>, so the engine decides as that user."""
    import re

    import nkeys

    from .security.nats_auth import AuthKeys, client_permissions, mint_user, write_creds

    # one subject token each: the engine reads the user from the control subject, and the
    # namespace is a Kubernetes one (a DNS-1123 label)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", args.namespace):
        print(f"error: --namespace {args.namespace!r}: not a Kubernetes namespace name", file=sys.stderr)
        return EXIT_INVALID
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.user):
        print(f"error: --user {args.user!r}: letters, digits, '-' and '_' only", file=sys.stderr)
        return EXIT_INVALID
    try:
        keys = AuthKeys.load(Path(args.keys))
        if not keys.account_seed.startswith("SA"):
            raise nkeys.ErrInvalidSeed()
        keys.account_public_key  # noqa: B018  # decodes the seed: a corrupt one fails here
    except OSError as exc:
        print(f"error: --keys {args.keys}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    except (ValueError, KeyError, TypeError, AttributeError, nkeys.NkeysError):
        print(
            f"error: --keys {args.keys}: not a keys file (keys.json of the keys Secret: JSON with "
            "an 'account' seed, SA...)",
            file=sys.stderr,
        )
        return EXIT_INVALID
    creds = mint_user(keys, args.user, client_permissions(args.namespace, args.user))
    if args.output in (None, "-"):
        sys.stdout.write(creds)
        return EXIT_OK
    try:
        write_creds(Path(args.output), creds)
    except OSError as exc:
        print(f"error: -o {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"{args.output}: {args.user}'s credential for namespace {args.namespace}", file=sys.stderr)
    return EXIT_OK


def cmd_operator(args: argparse.Namespace) -> int:
    from .kube.main import run_operator

    _hosting_engine(args)
    return int(run_operator())


def cmd_dev(args: argparse.Namespace) -> int:
    from .local.dev import HttpPortError, dev
    from .local.runner import MetricsPortError
    from .local.supervision import Interrupted, until_signalled

    err = Console(stderr=True)
    bundle = _load(args.paths, err)
    if bundle is None:
        return EXIT_INVALID
    if not _references_resolve(args.env_file, [agent for agent, _ in bundle.agents.values()], err, bundle):
        return EXIT_INVALID
    _hosting_engine(args)
    try:
        return int(
            asyncio.run(
                until_signalled(
                    dev(
                        bundle,
                        nats_url=args.nats,
                        metrics_port=args.metrics_port,
                        console=err,
                        secure=args.secure,
                        http_port=args.http_port,
                    )
                )
            )
        )
    except (MetricsPortError, HttpPortError) as exc:
        err.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_INVALID
    except (Interrupted, KeyboardInterrupt):  # how dev is stopped: everything it started is
        err.print("stopped: agents and server too")
        return EXIT_OK


STEP_SEMANTICS = """\
how a step's attempts behave (details: README.md):
  timeout           start-to-close: counts from the moment an agent starts the attempt,
                    never while it waits in the agent's queue; expiry is retryable
  heartbeatTimeout  the longest an agent may stay silent while running an attempt
  queueTimeout      schedule-to-start: how long an attempt may wait for an agent to
                    start it; expiry is a retryable QueueTimeout (the task is skipped)
  retry             {limit, backoff, nonRetryable}: every exception a handler raises is
                    retried up to limit (default 0), timeouts too; FatalError is not, nor
                    the types (or base classes) listed in retry.nonRetryable
  task.context      shared by the steps of a run: get, put, keys, and
                    update(key, fn, default) -- an atomic read-modify-write (compare-and-
                    swap, retried on conflict; update_sync in sync handlers); each write
                    is in `cadenza audit`
  timing            --output json and WorkflowRun status split each attempt's time into
                    waiting (scheduling: ready -> queued, queued: queued -> started) and
                    executing (started -> finished)
"""


ENV_FILE_HELP = (
    "a dotenv file of CADENZA_SECRET_<NAME>_<KEY> / CADENZA_CONFIGMAP_<NAME>_<KEY> variables "
    "resolving the Agents' secretKeyRef/configMapKeyRef/envFrom (the environment wins)"
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cadenza")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadenza",
        description="Multi-agent workflows on NATS JetStream and Kubernetes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=STEP_SEMANTICS,
    )
    parser.add_argument("--version", action="version", version=f"cadenza {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run one workflow locally, with an embedded nats-server",
        epilog=(
            "Failed attempts: every exception a handler raises (ConnectionResetError, KeyError, ...) is "
            "retried under the step's retry policy (retry.limit, default 0), and so are timeouts; "
            "FatalError is not, nor the exception types (or their base classes) the step lists in "
            "retry.nonRetryable, e.g. [OSError, ValueError]."
        ),
    )
    run.add_argument("paths", nargs="+", help="manifest files or folders")
    run.add_argument("--workflow", help="workflow to run when the paths define several")
    run.add_argument("--input", help="run input: JSON, or @FILE")
    run.add_argument("--output", "-o", choices=["text", "json"], default="text")
    run.add_argument(
        "--approve", action="append", default=[], metavar="STEP", help="approve this step when it waits"
    )
    run.add_argument(
        "--reject", action="append", default=[], metavar="STEP", help="reject this step when it waits"
    )
    run.add_argument(
        "--signal",
        action="append",
        default=[],
        metavar="NAME[=JSON]",
        help="send this signal to the run when it starts",
    )
    run.add_argument("--by", default="cli", help="name recorded as the approver")
    run.add_argument("--nats", help="use this NATS server instead of an embedded one")
    run.add_argument("--secure", action="store_true", help=SECURE_HELP)
    run.add_argument("--timeout", type=float, help="cancel the run after this many seconds")
    run.add_argument("--metrics-port", type=int, metavar="PORT", help=METRICS_HELP)
    run.add_argument("--env-file", metavar="FILE", help=ENV_FILE_HELP)
    run.set_defaults(fn=cmd_run)

    val = sub.add_parser("validate", help="validate manifests offline")
    val.add_argument("paths", nargs="+")
    val.set_defaults(fn=cmd_validate)

    dev = sub.add_parser("dev", help="keep NATS, the engine and agents running: triggers, approvals, signals")
    dev.add_argument("paths", nargs="+")
    dev.add_argument("--nats", help="use this NATS server instead of an embedded one")
    dev.add_argument("--secure", action="store_true", help=SECURE_HELP)
    dev.add_argument("--metrics-port", type=int, metavar="PORT", help=METRICS_HELP)
    dev.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="serve the web console (runs, graphs, approvals) and /metrics on 127.0.0.1:PORT "
        "(0: any free port, printed)",
    )
    dev.add_argument("--env-file", metavar="FILE", help=ENV_FILE_HELP)
    dev.set_defaults(fn=cmd_dev)

    def nats_option(cmd: argparse.ArgumentParser) -> None:
        """--nats for a command that needs a running server; CADENZA_NATS_URL when absent,
        as agents and the operator read it. (run and dev start their own unless --nats.)"""
        env = os.environ.get("CADENZA_NATS_URL") or None
        cmd.add_argument(
            "--nats",
            default=env,
            required=env is None,
            metavar="URL",
            help="the NATS server (default: $CADENZA_NATS_URL)",
        )
        cmd.add_argument(
            "--creds",
            metavar="FILE",
            help="NATS credentials file, for a server that authenticates (default: $CADENZA_NATS_CREDS)",
        )

    def run_command(name: str, fn: Any, helptext: str, *positionals: str) -> argparse.ArgumentParser:
        """A command that talks to a running engine about one run, through NATS."""
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("run")
        for positional in positionals:
            cmd.add_argument(positional)
        nats_option(cmd)
        cmd.add_argument("-n", "--namespace", default="default", help="the run's namespace")
        cmd.add_argument(
            "--kubeconfig",
            metavar="FILE",
            help="look RUN up as a WorkflowRun name with this kubeconfig when it is no run id "
            "(default: $KUBECONFIG, else ~/.kube/config if present)",
        )
        cmd.set_defaults(fn=fn, resolve_run=True)  # main() turns RUN into a run id (resolve_run)
        return cmd

    def engine_command(name: str, fn: Any, helptext: str, *positionals: str) -> argparse.ArgumentParser:
        """A command a running engine checks against the run before applying it."""
        cmd = run_command(name, fn, f"{helptext}; checked by a running engine", *positionals)
        cmd.description = f"{helptext[0].upper()}{helptext[1:]}. {CONTROL_HELP}"
        cmd.add_argument(
            "--wait",
            type=float,
            default=CONTROL_WAIT,
            metavar="SECONDS",
            help=f"how long to wait for an engine's answer (default {CONTROL_WAIT:g})",
        )
        cmd.set_defaults(resolve_run=False)  # _control resolves RUN, once the arguments are checked
        return cmd

    ap = engine_command(
        "approve",
        cmd_approve,
        "approve (or --reject) a step of a run that waits for approval",
        "step",
    )
    ap.add_argument("--reject", action="store_true", help="reject instead of approving")
    ap.add_argument("--by", default="cli", help="who decides: must be in the step's approvers, if it has any")
    ap.add_argument("--comment")

    sig = engine_command("signal", cmd_signal, "send a named signal to a running run", "name")
    sig.add_argument("--payload", help="the signal's payload, as JSON (the waiting step's output)")
    sig.add_argument("--by", default="cli")

    can = engine_command("cancel", cmd_cancel, "cancel a running run")
    can.add_argument("--reason", default="")
    can.add_argument("--by", default="cli")

    res = engine_command(
        "resume", cmd_resume, "resume a run paused by its budget (exit 1 when it is not Paused)"
    )
    res.add_argument("--tokens", type=int, help="the run's new token budget (input plus output)")
    res.add_argument("--cost", type=float, help="the run's new cost budget")
    res.add_argument("--by", default="cli")

    aud = run_command(
        "audit",
        cmd_audit,
        "print the decisions taken for a run (or every run with '>'); exit 2 for an unknown run",
    )
    aud.add_argument("--output", "-o", choices=["text", "json"], default="text")

    diag = sub.add_parser(
        "diagnose",
        help="where a workflow's recent runs wait, retry (and whether with load), give different "
        "outputs for the same input, and write the most audit records",
    )
    diag.add_argument("workflow")
    nats_option(diag)
    diag.add_argument("-n", "--namespace", default="default")
    diag.add_argument(
        "--since", default="1h", metavar="DURATION", help="runs started within this (default 1h; 30m, 2h, 1d)"
    )
    diag.add_argument("--output", "-o", choices=["text", "json"], default="text")
    diag.set_defaults(fn=cmd_diagnose)

    logs = run_command(
        "logs",
        cmd_logs,
        "print what a run's handlers logged (task.log), of one STEP when given; exit 2 for an unknown run",
    )
    logs.add_argument("step", nargs="?", help="only this step's lines; STEP#ITEM: a forEach item's (each#3)")
    logs.add_argument("--attempt", type=int, metavar="N", help="only attempt N (from 1)")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="print new lines as they come until the run ends"
    )
    logs.add_argument(
        "--output", "-o", choices=["text", "json"], default="text", help="json: one object per line"
    )

    lst = sub.add_parser("list", help="list runs, newest first (like argo list)")
    nats_option(lst)
    lst.add_argument("-n", "--namespace", default="default", help="the runs of this namespace (default)")
    lst.add_argument("-A", "--all-namespaces", action="store_true", help="the runs of every namespace")
    lst.add_argument("--workflow", metavar="NAME", help="only runs of this workflow")
    lst.add_argument("--phase", metavar="PHASE", help="only runs in this phase (Running, Failed, ...)")
    lst.add_argument("--since", metavar="DURATION", help="only runs created this recently: 90s, 15m, 1h, 2d")
    lst.add_argument("--limit", type=int, default=500, help="show the newest N (default 500)")
    lst.add_argument("--output", "-o", choices=["text", "wide", "json"], default="text")
    lst.set_defaults(fn=cmd_list)

    get = run_command(
        "get",
        cmd_get,
        "show a run as a tree of steps: phases, attempts, waiting vs executing, usage, messages",
    )
    get.add_argument("--output", "-o", choices=["text", "json"], default="text")
    get.add_argument(
        "--watch",
        "-w",
        action="store_true",
        help="show each change of the run until it ends: redrawn on a terminal; piped, a tree "
        "per change, or with -o json one JSON document a line",
    )

    rt = engine_command(
        "retry",
        cmd_retry,
        "start a finished run again as a new run that reuses the outputs of its steps that "
        "succeeded and re-runs the others and what depends on them",
    )
    rt.add_argument(
        "--from",
        dest="from_step",
        metavar="STEP",
        help="re-run STEP and what depends on it too, even if they succeeded",
    )
    rt.add_argument("--by", default="cli")

    dead = sub.add_parser("dead-letters", help="list tasks and events given up on, with the reason")
    nats_option(dead)
    dead.add_argument("--limit", type=int, default=100, help="show the newest N (default 100)")
    dead.add_argument("--output", "-o", choices=["text", "json"], default="text")
    dead.set_defaults(fn=cmd_dead_letters)

    pub = sub.add_parser("publish", help="publish a JSON event on a subject (to exercise NATS triggers)")
    pub.add_argument("subject")
    pub.add_argument("payload", help="JSON")
    nats_option(pub)
    pub.set_defaults(fn=cmd_publish)

    eng = sub.add_parser("engine", help="run a standalone engine process against a NATS server")
    nats_option(eng)
    eng.add_argument(
        "--name", help="the engine's name in logs (default: $CADENZA_ENGINE_NAME, else engine-HOST-PID)"
    )
    eng.set_defaults(fn=cmd_engine)  # --creds: nats_option

    crds = sub.add_parser("crds", help="regenerate the CRDs from the models")
    crds.add_argument("--output-dir", default="crds")
    crds.set_defaults(fn=cmd_crds)

    auth = sub.add_parser("nats-auth", help="the authenticated bus's keys in a cluster")
    auth_sub = auth.add_subparsers(dest="nats_auth_command", required=True)
    init = auth_sub.add_parser(
        "init", help="create the keys Secret (seeds, server include, engine creds) unless it exists"
    )
    init.add_argument("--namespace", required=True, help="the release's namespace")
    init.add_argument("--secret", required=True, help="the keys Secret's name")
    init.set_defaults(fn=cmd_nats_auth_init)
    mint = auth_sub.add_parser(
        "mint-client",
        help="a CLI credential for one user of one namespace (control requests as that user, reads)",
    )
    mint.add_argument("--keys", required=True, metavar="FILE", help="keys.json from the keys Secret")
    mint.add_argument("--namespace", required=True, help="the namespace whose runs the user may steer")
    mint.add_argument(
        "--user", required=True, help="the identity the engine records and checks approvers against"
    )
    mint.add_argument("-o", "--output", metavar="FILE", help="write the .creds here (0600); default stdout")
    mint.set_defaults(fn=cmd_nats_auth_mint_client)

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf + engine)")
    op.set_defaults(fn=cmd_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cadenza import configure_logging

    args = build_parser().parse_args(argv)
    args.own_process = argv is None  # run as `cadenza ...`, not called by other code
    creds = getattr(args, "creds", None)
    if creds:
        if not os.path.isfile(creds):
            print(f"error: --creds {creds}: no such file", file=sys.stderr)
            return EXIT_INVALID
        os.environ["CADENZA_NATS_CREDS"] = creds  # read by every connection we open (nats_options)
    if os.environ.get("CADENZA_NATS_CA"):  # every connection we open reads it (nats_options)
        from cadenza.nats import tls_context

        try:
            tls_context(os.environ["CADENZA_NATS_CA"])
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_INVALID
    if getattr(args, "secure", False) and args.nats:
        print("error: --secure runs its own NATS server in operator mode: leave out --nats", file=sys.stderr)
        return EXIT_INVALID
    # Logs go to stderr; the CLI's own output (and --output json) alone to stdout.
    configure_logging(level="INFO" if args.command in ("operator", "dev", "engine") else "WARNING")
    from cadenza.nats import NatsUnreachable
    from nats.errors import TimeoutError as NatsTimeout

    from .engine.settings import SettingsError

    try:
        if getattr(args, "resolve_run", False):
            args.run = resolve_run(args)
        code: int = args.fn(args)
    except UnknownRun as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except NatsUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SettingsError as exc:  # a malformed CADENZA_* variable, named in the message
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except NatsTimeout:
        # A server refuses what a credential may not do by never answering it (the
        # permissions violation goes to the connection's log, above): say so.
        print(
            "error: NATS did not answer a request: the server is overloaded, or the credential "
            "(--creds, $CADENZA_NATS_CREDS) is not allowed this (docs/security.md: roles)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    return code


if __name__ == "__main__":
    sys.exit(main())
