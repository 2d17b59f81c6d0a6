"""Each step's input as the console and `cadenza get --output json` show it.

The run record keeps no rendered step input, only its hash per attempt (`Attempt.inputHash`):
storing the value would grow every decision's write by the size of every input. So the
input is rendered again here, by the engine's own pure function (decide's
`step_input_now`, what dispatch sends), over the record as it is now, loading the values
kept apart that it reads as the engine does, at most MAX_LOAD_BYTES of them. Its hash
against the newest attempt's says whether it is what that attempt received; a forEach
step (rendered per item), a step not dispatched yet, or one whose input no longer renders
shows its template instead, labelled.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from cadenza.nats import resolve_payload
from cadenza.wire import OUTPUTS_BUCKET, PAYLOADS_STORE, REF_KEY, is_ref, loads, payloads_store

from ..engine.decide import OBJECT_REF_PREFIX, MissingOutputs, step_input_now, value_hash
from ..engine.infra import current_entries
from ..expressions import ExpressionError

if TYPE_CHECKING:
    from ..engine.client import RunClient
    from ..engine.definition import CompiledStep, CompiledWorkflow
    from ..engine.state import RunState

MAX_LOAD_BYTES = 1024 * 1024
"""The most of values kept apart (outputs, a large run input) read to render one step's
input for display: a larger input is shown as its template, marked too large."""
MAX_LOAD_ROUNDS = 10
"""Rounds of loading: each render names the values it lacks (the engine's runtime does the same)."""


class Rendering(StrEnum):
    RENDERED = "rendered"
    """Rendered now and equal (by hash) to what the newest attempt received."""
    DIFFERS = "differs"
    """Rendered now, but the record changed since the newest attempt was dispatched."""
    UNCHECKED = "unchecked"
    """Rendered now; the attempt carries no hash to compare with (a record from before hashes)."""
    TEMPLATE = "template"
    """Not rendered: the template, and why (`label`)."""


@dataclass(frozen=True)
class StepInput:
    shown: Rendering
    label: str
    """What the value is, for a person: a heading in the console, `label` in JSON."""
    value: Any
    """The rendered input, or the step's template when `shown` is TEMPLATE."""
    attempt: int | None = None
    """The attempt compared with (the newest)."""
    items: int | None = None
    """A forEach step's number of items, once known."""

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"shown": str(self.shown), "label": self.label, "value": self.value}
        if self.attempt is not None:
            doc["attempt"] = self.attempt
        if self.items is not None:
            doc["items"] = self.items
        return doc


class _TooLarge(Exception):
    pass


def step_def(wf: CompiledWorkflow, name: str) -> CompiledStep | None:
    if wf.on_exit is not None and wf.on_exit.name == name:
        return wf.on_exit
    return wf.steps.get(name)


async def step_input(
    client: RunClient, state: RunState, wf: CompiledWorkflow, name: str, *, limit: int = MAX_LOAD_BYTES
) -> StepInput | None:
    """Step `name`'s input as it is best shown now (None: the definition has no such step)."""
    cs = step_def(wf, name)
    if cs is None:
        return None
    template = cs.spec.input
    st = state.steps.get(name)
    if cs.for_each is not None:
        total = st.forEach.total if st is not None and st.forEach is not None else None
        each = f"each of {total} items" if total is not None else "each item, once the items are known"
        return StepInput(Rendering.TEMPLATE, f"template, rendered for {each}", template, items=total)
    last = st.attempts[-1] if st is not None and st.attempts else None
    if last is None:
        return StepInput(Rendering.TEMPLATE, "template: the step's inputs are not available yet", template)
    loaded: dict[str, Any] = {}
    budget = [limit]
    try:
        for _ in range(MAX_LOAD_ROUNDS):
            try:
                value = step_input_now(state, wf, name, loaded)
                break
            except MissingOutputs as missing:
                for key in sorted(missing.keys):
                    loaded.update(await _load(client, key, state, budget))
        else:
            return StepInput(Rendering.TEMPLATE, "template: its inputs could not be loaded", template, last.n)
    except _TooLarge:
        return StepInput(
            Rendering.TEMPLATE,
            f"template: the input is too large to show (over {limit} bytes to read)",
            template,
            last.n,
        )
    except ExpressionError as exc:
        return StepInput(Rendering.TEMPLATE, f"template: it does not render now ({exc})", template, last.n)
    if last.inputHash is None:
        return StepInput(
            Rendering.UNCHECKED, f"re-rendered now (attempt {last.n} kept no hash)", value, last.n
        )
    if value_hash(value) == last.inputHash:
        return StepInput(
            Rendering.RENDERED, f"rendered input (what attempt {last.n} received)", value, last.n
        )
    return StepInput(
        Rendering.DIFFERS, f"re-rendered now (differs from what attempt {last.n} received)", value, last.n
    )


async def _load(client: RunClient, key: str, state: RunState, budget: list[int]) -> dict[str, Any]:
    """What the engine's runtime loads for `key` (runtime `_load_outputs`), counting the
    bytes read against `budget` (_TooLarge past it, before reading an object that would be)."""
    from nats.js.errors import KeyNotFoundError

    if key.startswith(OBJECT_REF_PREFIX):
        return {key: await _object(client, {REF_KEY: key[len(OBJECT_REF_PREFIX) :]}, state.namespace, budget)}
    if key.endswith(".*"):
        found: dict[str, Any] = {}
        async with aclosing(current_entries(client.js, OUTPUTS_BUCKET, client.outputs_kv, key)) as entries:
            async for entry in entries:
                if entry.value is not None:
                    found[entry.key] = await _entry(client, entry.value, state.namespace, budget)
        return found
    try:
        entry = await client.outputs_kv.get(key)
    except KeyNotFoundError:
        return {key: None}
    return {key: await _entry(client, entry.value, state.namespace, budget)}


async def _entry(client: RunClient, data: bytes, namespace: str, budget: list[int]) -> Any:
    _spend(budget, len(data))
    value = loads(data)
    return await _object(client, value, namespace, budget) if is_ref(value) else value


async def _object(client: RunClient, ref: dict[str, Any], namespace: str, budget: list[int]) -> Any:
    """A value in the object store, its size checked before it is read."""
    from nats.js.errors import NotFoundError

    for bucket in (payloads_store(namespace), PAYLOADS_STORE):  # resolve_payload's order
        try:
            info = await (await client.js.object_store(bucket)).get_info(ref[REF_KEY])
        except NotFoundError:
            continue
        _spend(budget, int(info.size or 0))
        break
    return await resolve_payload(client.js, ref, namespace=namespace)


def _spend(budget: list[int], size: int) -> None:
    budget[0] -= size
    if budget[0] < 0:
        raise _TooLarge
