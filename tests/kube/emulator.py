"""An HTTP Kubernetes API emulator for running the real kopf operator in tests.

No kube-apiserver can run on the machines these tests run on (no container engine), yet
the operator must be tested over real HTTP with the real kopf and the real ``kubernetes``
client. :class:`KubeEmulator` extends ``kmock.KubernetesEmulator`` (kmock 0.8), an
in-memory object store served over HTTP, with the API-server semantics kopf and the
client depend on and the stock emulator lacks or gets wrong:

* ``POST`` answers 201 Created (the client maps only 201 to the created object);
  ``generateName``; ``metadata.uid``, a cluster-wide monotonic ``resourceVersion``,
  ``creationTimestamp`` and ``generation`` (bumped on changes outside metadata/status).
* Optimistic concurrency: a stale ``metadata.resourceVersion`` in a patch or a PUT gives
  409 Conflict; a failed JSON-patch ``test`` op gives 422 (kopf's finalizer writes rely on
  it); a patch that changes nothing changes no ``resourceVersion`` and sends no event.
* The ``status`` subresource for resources that declare it: writes to the main resource
  ignore ``.status``, writes to ``/status`` change nothing but ``.status``, and ``.status``
  is dropped on create.
* ``PUT`` (replace), merge patches, JSON patches, and a naive server-side apply
  (create-or-merge, see below); ``dryRun=All``.
* Deletion honours finalizers (``deletionTimestamp`` first, removal once the last
  finalizer goes; no new finalizers once deleting), delete preconditions, and
  ``propagationPolicy=Orphan``. Objects whose every owner (by ``ownerReferences`` uid) is
  gone are deleted, as the garbage collector does in the background.
* Lists have ``kind: <Kind>List`` and the current ``resourceVersion``; label selectors
  (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and field selectors
  (``metadata.name``, ``metadata.namespace``, other dotted paths compared as strings)
  apply to lists and watches.
* Watches lose no event between the initial listing and the live stream, resume from a
  ``resourceVersion`` (every event is kept in memory), honour ``timeoutSeconds``,
  ``sendInitialEvents`` (with the initial-events-end bookmark), report objects entering
  or leaving a label selector as ADDED/DELETED, and end when the emulator stops.
* Discovery reports ``groupVersion: v1`` for the core group (kmock: ``/v1``); Namespace
  objects are served at ``/api/v1/namespaces[/name]`` (kmock 0.8 mis-parses those paths).
* CustomResourceDefinitions: :meth:`KubeEmulator.register_crd` and
  :meth:`KubeEmulator.load_crds` (from ``crds/*.yaml``), or creating a CRD over HTTP,
  serve its custom resources; deleting the CRD removes them.
* SubjectAccessReviews (``authorization.k8s.io/v1``) are answered by evaluating the
  Roles, ClusterRoles, RoleBindings and ClusterRoleBindings the emulator holds (rbac.py:
  what is and is not modelled); :attr:`KubeEmulator.access_reviews` keeps each review's spec.
* :attr:`KubeEmulator.request_log` records every API request as an RBAC verb, group,
  resource, subresource and namespace, to check a chart's RBAC against what was used.

What it does NOT do -- it is an emulator for tests, not a cluster:

* No schema validation, defaulting or pruning: any JSON object is stored as sent (only
  ``apiVersion``/``kind``/``metadata`` are checked). A test passing here can still be
  rejected by a real API server's OpenAPI schema.
* No admission (mutating/validating webhooks, ValidatingAdmissionPolicy), no quotas,
  no RBAC enforcement (every request is allowed; the request log only records them, and
  only SubjectAccessReviews evaluate RBAC),
  no authentication (any token is accepted).
* No built-in controllers: a Deployment never gets a ReplicaSet or Pods, never gets
  ``status.readyReplicas``, a Job never runs, a Service gets no endpoints -- unless the
  test sets them (:meth:`KubeEmulator.patch_object` with ``subresource='status'``).
* No namespace lifecycle: objects can be created in namespaces that do not exist, and
  deleting a Namespace deletes nothing in it.
* Garbage collection is background-only: ``Foreground`` is treated as ``Background``,
  ``blockOwnerDeletion`` is ignored, and owners are matched by uid alone (a cross-namespace
  owner reference, unresolvable for the real collector, keeps its dependent here).
  Deleting a CRD drops its objects without running their finalizers.
* Each version of a multi-version CRD is a separate store (no conversion), and discovery's
  ``preferredVersion`` among several versions is arbitrary.
* Strategic merge patches are applied as JSON merge patches (lists are replaced, not
  merged by key; ``$patch`` directives are not understood). Server-side apply is a
  create-or-merge-patch: no field managers, no conflicts, fields removed from the applied
  configuration are not removed from the object.
* No ``limit``/``continue`` pagination (lists return everything), no watch bookmarks
  other than the initial-events-end one, never 410 Gone, no ``scale`` or other
  subresources than ``status``, no ``managedFields``, no CRD conversion webhooks.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import dataclasses
import datetime
import json
import pathlib
import random
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Self

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml

# kmock wraps errors of already-started streams into this; the namespace-collection shim
# below must unwrap it as kmock's own request entry point does.
from kmock._internal.rendering import StreamingError

from .rbac import Policy
from .rbac import Request as AccessRequest

__all__ = [
    "CRD_RESOURCE",
    "ApiCall",
    "ApiPath",
    "FieldSelector",
    "KubeEmulator",
    "LabelSelector",
    "ResourceRef",
    "merge_patch",
    "rbac_verb",
]

JsonObject = dict[str, Any]
ResourceRef = str | kmock.resource

CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
"""Where CustomResourceDefinitions live; creating one there registers its resources."""

SUBJECT_ACCESS_REVIEWS = kmock.resource("authorization.k8s.io", "v1", "subjectaccessreviews")
RBAC_GROUP = "rbac.authorization.k8s.io"

CRD_VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})
"""The verbs a real API server advertises in discovery for every custom resource."""

WATCH_POLL_SECONDS = 0.5
"""How often an idle watch checks whether its client went away or the emulator stops.

aiohttp does not cancel handlers when a client disconnects, and waits up to 60 s for them
at shutdown, so an idle watch must notice both by itself to let tests end promptly."""

_SERVER_OWNED_METADATA = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
)
"""Metadata only the server sets: a client's update keeps the stored values (name and
namespace changes are rejected before this, as upstream)."""

_GENERATE_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the API server's: no vowels, no 0/1/3
_MERGE_PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
_JSON_PATCH_TYPE = "application/json-patch+json"
_APPLY_PATCH_TYPE = "application/apply-patch+yaml"


# --------------------------------------------------------------------------------------
# Errors, shaped like the API server's so that the client and kopf classify them by code.
# --------------------------------------------------------------------------------------


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message)


def _bad_request(message: str) -> kmock.KubernetesError:
    return _error(400, "BadRequest", message)


def _not_found(message: str) -> kmock.KubernetesError:
    return _error(404, "NotFound", message)


def _conflict(message: str) -> kmock.KubernetesError:
    return _error(409, "Conflict", message)


def _invalid(message: str) -> kmock.KubernetesError:
    return _error(422, "Invalid", message)


def _status_body(exc: kmock.KubernetesError) -> JsonObject:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": exc.status,
        "reason": exc.reason or type(exc).__name__,
        "message": exc.message or repr(exc),
        "details": exc.details or {},
    }


# --------------------------------------------------------------------------------------
# Request paths and the request log.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ApiPath:
    """A resource URL taken apart the way the API server does.

    Parsed here rather than taken from kmock's request because kmock 0.8 mis-parses the
    Namespace paths (``/api/v1/namespaces`` crashes its parser, ``/api/v1/namespaces/x``
    comes out as "namespace x, no resource").
    """

    group: str
    version: str
    plural: str
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None

    @classmethod
    def parse(cls, path: str) -> ApiPath | None:
        """Parse ``/api/v1/...`` or ``/apis/GROUP/VERSION/...``; None for other paths."""
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if not all(rest):
            return None
        namespace: str | None = None
        namespace_subresource = group == "" and len(rest) == 3 and rest[2] in {"status", "finalize"}
        if rest[0] == "namespaces" and len(rest) >= 3 and not namespace_subresource:
            namespace, rest = rest[1], rest[2:]
        return cls(
            group=group,
            version=version,
            plural=rest[0],
            namespace=namespace,
            name=rest[1] if len(rest) > 1 else None,
            subresource="/".join(rest[2:]) or None,
        )

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)


def rbac_verb(method: str, path: ApiPath, params: Mapping[str, str]) -> str:
    """The RBAC verb the API server would authorize this request against."""
    method = method.upper()
    if method in {"GET", "HEAD"}:
        if _is_true(params.get("watch")):
            return "watch"
        return "get" if path.name is not None else "list"
    if method == "DELETE":
        return "delete" if path.name is not None else "deletecollection"
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch"}
    return verbs.get(method, method.lower())


class ApiCall(NamedTuple):
    """One API request, in the terms RBAC rules are written in.

    A plain tuple underneath, so tests can compare it with
    ``("patch", "cadenza.dev", "agents", "status", "default")``. Server-side apply is a
    ``patch``; a request for a Namespace object carries that namespace's name as
    ``namespace``, as the API server's authorizer sees it.
    """

    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None


def _is_true(value: str | None) -> bool:
    return value is not None and value.lower() in {"true", "1"}


# --------------------------------------------------------------------------------------
# Selectors.
# --------------------------------------------------------------------------------------

_LABEL_REQUIREMENT = re.compile(
    r"""^\s*(?:
        !\s*(?P<absent>[\w./-]+)
      | (?P<key>[\w./-]+)\s*(?:
            (?P<op>==|=|!=)\s*(?P<value>[\w.-]*)
          | \s(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
        )?
    )\s*$""",
    re.VERBOSE,
)
_FIELD_REQUIREMENT = re.compile(r"^\s*(?P<key>[\w.-]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*?)\s*$")


def _split_terms(selector: str) -> list[str]:
    """Split on the commas that are not inside ``in (a, b)`` value sets."""
    terms: list[str] = []
    depth, start = 0, 0
    for index, char in enumerate(selector):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(selector[start:index])
            start = index + 1
    terms.append(selector[start:])
    return [term for term in terms if term.strip()]


@dataclasses.dataclass(frozen=True)
class LabelSelector:
    """A parsed ``labelSelector``; parsed before serving so a bad one is a 400, not a 500."""

    requirements: tuple[Callable[[Mapping[str, str]], bool], ...] = ()

    @classmethod
    def parse(cls, selector: str | None) -> LabelSelector:
        requirements: list[Callable[[Mapping[str, str]], bool]] = []
        for term in _split_terms(selector or ""):
            match = _LABEL_REQUIREMENT.match(term)
            if match is None:
                raise _bad_request(f"unable to parse requirement: {term.strip()!r}")
            requirements.append(cls._requirement(match))
        return cls(tuple(requirements))

    @staticmethod
    def _requirement(match: re.Match[str]) -> Callable[[Mapping[str, str]], bool]:
        if (absent := match["absent"]) is not None:
            return lambda labels: absent not in labels
        key: str = match["key"]
        if match["op"] in {"=", "=="}:
            value: str = match["value"]
            return lambda labels: labels.get(key) == value
        if match["op"] == "!=":
            value = match["value"]
            return lambda labels: labels.get(key) != value
        if match["setop"] is not None:
            values = {item.strip() for item in match["values"].split(",")}
            if match["setop"] == "in":
                return lambda labels: key in labels and labels[key] in values
            return lambda labels: key not in labels or labels[key] not in values
        return lambda labels: key in labels

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement(labels) for requirement in self.requirements)


@dataclasses.dataclass(frozen=True)
class FieldSelector:
    """A parsed ``fieldSelector``. Missing fields compare as the empty string, as upstream."""

    requirements: tuple[tuple[str, bool, str], ...] = ()  # (dotted path, equal?, value)

    @classmethod
    def parse(cls, selector: str | None) -> FieldSelector:
        requirements: list[tuple[str, bool, str]] = []
        for term in _split_terms(selector or ""):
            match = _FIELD_REQUIREMENT.match(term)
            if match is None:
                raise _bad_request(f"invalid field selector: {term.strip()!r}")
            requirements.append((match["key"], match["op"] != "!=", match["value"]))
        return cls(tuple(requirements))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all((_field_text(obj, path) == value) == equal for path, equal, value in self.requirements)


def _field_text(obj: Mapping[str, Any], dotted: str) -> str:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclasses.dataclass(frozen=True)
class _Scope:
    """Which objects a list or a watch sees: namespace, name, and selectors."""

    namespace: str | None
    name: str | None
    labels: LabelSelector
    fields: FieldSelector

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and (self.name is None or meta.get("name") == self.name)
            and self.labels.matches(meta.get("labels") or {})
            and self.fields.matches(obj)
        )


# --------------------------------------------------------------------------------------
# Patches.
# --------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, ``null`` deletes, the rest replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _json_patch(target: JsonObject, ops: list[Any]) -> JsonObject:
    try:
        result = jsonpatch.apply_patch(target, ops, in_place=False)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise _invalid(f"the server rejected our request due to an error in our request: {exc}") from exc
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError) as exc:
        raise _invalid(f"invalid JSON patch: {exc}") from exc
    if not isinstance(result, dict):
        raise _invalid("the JSON patch did not produce an object")
    return result


# --------------------------------------------------------------------------------------
# The emulator.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Event:
    """One change in the event log; ``old`` lets selector-filtered watches see objects
    entering (ADDED) or leaving (DELETED) their selection."""

    rv: int
    type: str
    object: JsonObject
    old: JsonObject | None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _as_resource(resource: ResourceRef) -> kmock.resource:
    return resource if isinstance(resource, kmock.resource) else kmock.resource(resource)


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _meta(obj: Mapping[str, Any]) -> JsonObject:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _header(request: kmock.Request, name: str) -> str:
    return next((value for key, value in request.headers.items() if key.lower() == name.lower()), "")


def _json_body(request: kmock.Request) -> Any:
    if not request.text.strip():
        return None
    try:
        return json.loads(request.text)
    except ValueError as exc:
        raise _bad_request(f"the request body is not valid JSON: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class _DeleteOptions:
    """DeleteOptions, from the query string or the body (clients use either)."""

    propagation: str
    preconditions: Mapping[str, Any]
    dry_run: bool

    @classmethod
    def parse(cls, request: kmock.Request) -> _DeleteOptions:
        body = _json_body(request) or {}
        if not isinstance(body, dict):
            raise _bad_request("DeleteOptions must be a JSON object")
        return cls(
            propagation=request.params.get("propagationPolicy")
            or body.get("propagationPolicy")
            or "Background",
            preconditions=body.get("preconditions") or {},
            dry_run=request.params.get("dryRun") == "All" or "All" in (body.get("dryRun") or []),
        )


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the API-server semantics kopf relies on.

    Every state change goes through one synchronous code path (no ``await`` inside), so
    it is atomic in the event loop without locks: a watch's snapshot and its position in
    the event log can never disagree. Call the in-process helpers (``create_object``,
    ``patch_object``, ...) from the event loop's thread only; blocking clients such as the
    ``kubernetes`` package must run in a worker thread (``asyncio.to_thread``) because
    the emulator serves HTTP from the same loop.
    """

    # One counter for all resources, as etcd's revision: kopf compares versions across kinds.
    _last_rv: int = attrs.field(default=0, init=False)
    # Every change ever made, per resource, kept so that any watch can resume from any
    # resourceVersion (so the emulator never needs 410 Gone; tests are short-lived).
    _events: defaultdict[kmock.resource, list[_Event]] = attrs.field(
        factory=lambda: defaultdict(list), init=False
    )
    # Set (and replaced) on each change of a resource, to wake its idle watches.
    _wakeups: dict[kmock.resource, asyncio.Event] = attrs.field(factory=dict, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _calls: list[ApiCall] = attrs.field(factory=list, init=False)
    # Requests that created an object: _handle turns their 200 into a 201 (kmock answers 200).
    _created: set[kmock.Request] = attrs.field(factory=set, init=False)
    # CRD name -> the resources it serves, to unserve them when the CRD changes or goes.
    _crds: dict[str, list[kmock.resource]] = attrs.field(factory=dict, init=False)
    # The spec of every SubjectAccessReview asked, in order.
    _reviews: list[JsonObject] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # kmock routes by its own guess of the Kubernetes action, which has no PUT, no
        # delete-collection and no Namespace objects: catch every resource path as well.
        self.fallback[re.compile(r"/api/v1/.+|/apis/[^/]+/[^/]+/.+")] << self._serve_resource_request

    # ---------------------------------------------------------------- lifecycle & HTTP

    @contextlib.asynccontextmanager
    async def serving(self, host: str = "127.0.0.1") -> AsyncIterator[Self]:
        """Serve over HTTP on ``host`` (a random port; see ``.url``) until the block ends.

        Open watches are ended before the server stops, since aiohttp would otherwise
        wait for them for a minute.
        """
        async with self, kmock.Server(self, host=host):
            try:
                yield self
            finally:
                self.stop_watches()

    def stop_watches(self) -> None:
        """End every open watch stream now and every later one at once."""
        self._stopping = True
        for wakeup in self._wakeups.values():
            wakeup.set()
        self._wakeups.clear()

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path.rstrip("/") != "/api/v1/namespaces":
            return await super().__call__(raw_request)
        # kmock 0.8's request parser crashes on exactly this path: build the request here.
        body = await raw_request.read()
        method = raw_request.method.upper()
        watch = method == "GET" and _is_true(raw_request.query.get("watch"))
        action = {"GET": kmock.action.LIST, "POST": kmock.action.CREATE}.get(method)
        request = kmock.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=method,
            params=dict(raw_request.query),
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            body=body,
            text=await raw_request.text(),
            action=kmock.action.WATCH if watch else action,
            resource=kmock.resource("", "v1", "namespaces"),
        )
        self._requests.append(request)
        try:
            return await self._handle(request)
        except StreamingError as exc:
            response: aiohttp.web.StreamResponse = exc.args[0]
            self._record_error(exc.__cause__ or exc)
            if not response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, response)
            await response.write_eof()
            return response
        except Exception as exc:
            self._record_error(exc)
            return await self._render_error(exc)

    def _record_error(self, exc: BaseException) -> None:
        if self._errors and isinstance(exc, Exception):
            self._errors[-1].append(exc)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = ApiPath.parse(request.url.path)
        if path is not None:
            namespace = (
                path.name if path.resource == kmock.resource("", "v1", "namespaces") else path.namespace
            )
            verb = rbac_verb(str(request.method.value), path, request.params)
            self._calls.append(ApiCall(verb, path.group, path.plural, path.subresource, namespace))
        try:
            # Skip KubernetesEmulator._handle on purpose: it stores objects with kmock's
            # own (naive) semantics before any reaction runs; here, storage happens in
            # _serve_resource_request, so a test's own reaction (a fault injected with
            # kmock's DSL) answers instead of the store and changes nothing.
            response = await kmock.KubernetesScaffold._handle(self, request)
        except kmock.KubernetesError as exc:
            # An API error is an answer, not an emulator failure: keep it out of .errors.
            return aiohttp.web.json_response(_status_body(exc), status=exc.status)
        finally:
            created = request in self._created
            self._created.discard(request)
        if created and response.status == 200 and not response.prepared:
            response.set_status(201)
        return response

    # kmock's action-routed fallbacks all land in the one dispatcher below.
    async def _serve_list(self, request: kmock.Request) -> Any:
        return await self._serve_resource_request(request)

    async def _serve_watch(self, request: kmock.Request) -> Any:  # type: ignore[override]
        return await self._serve_resource_request(request)

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        return await self._serve_resource_request(request)

    async def _serve_create(self, request: kmock.Request) -> Any:
        return await self._serve_resource_request(request)

    async def _serve_update(self, request: kmock.Request) -> Any:
        return await self._serve_resource_request(request)

    async def _serve_delete(self, request: kmock.Request) -> Any:
        return await self._serve_resource_request(request)

    async def _serve_version(self, request: kmock.Request) -> Any:
        result = await super()._serve_version(request)
        if isinstance(result, dict):
            result["groupVersion"] = str(result["groupVersion"]).lstrip("/")  # kmock: "/v1"
        return result

    def _get_resources(self) -> list[kmock.resource]:
        # Declared resources (and those implied by a test's reactions) only: kmock also
        # lists resources that merely have stored objects, which would keep a deleted
        # CRD's resources discoverable.
        return kmock.KubernetesScaffold._get_resources(self)

    async def _serve_resource_request(self, request: kmock.Request) -> Any:
        path = ApiPath.parse(request.url.path)
        if path is None:
            # kmock serves discovery without a trailing slash only; the official client
            # asks for "/api/v1/".
            stripped = request.url.path.rstrip("/")
            if request.method == kmock.method.GET and re.fullmatch(r"/api/[^/]+|/apis/[^/]+/[^/]+", stripped):
                return await self._serve_version(request)
            if request.method == kmock.method.GET and re.fullmatch(r"/apis/[^/]+", stripped):
                return await self._serve_group(request)
            raise _not_found(f"the server could not find the requested resource: {request.url.path}")
        params = request.params
        dry_run = params.get("dryRun") == "All"
        verb = rbac_verb(str(request.method.value), path, params)
        if path.resource == SUBJECT_ACCESS_REVIEWS and verb == "create":
            review = self._review(_json_body(request))
            self._created.add(request)
            return review
        if path.subresource is not None and verb not in {"get", "update", "patch"}:
            raise _not_found(f"subresource {path.subresource!r} is not served for {verb!r} by the emulator")
        match verb:
            case "get":
                assert path.name is not None
                return self._read(path.resource, path.namespace, path.name, path.subresource)
            case "list":
                return self._list(path, params)
            case "watch":
                return self._open_watch(request, path, params)
            case "create":
                if path.namespace is None and self._info(path.resource).namespaced:
                    raise _error(405, "MethodNotAllowed", f"{path.plural} are created in a namespace's URL")
                body = _json_body(request)
                created = self._create(path.resource, path.namespace, body, dry_run=dry_run)
                self._created.add(request)
                return created
            case "update":
                return self._replace(path, _json_body(request), dry_run=dry_run)
            case "patch":
                return self._patch(request, path, dry_run=dry_run)
            case "delete":
                return self._delete_request(request, path)
            case "deletecollection":
                return self._delete_collection(request, path)
        raise _error(405, "MethodNotAllowed", f"the server does not allow this method: {request.method}")

    # ---------------------------------------------------------------- access reviews

    def _review(self, body: Any) -> JsonObject:
        """A SubjectAccessReview answered from the RBAC objects held (not stored, as upstream)."""
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            raise _bad_request("a SubjectAccessReview needs a spec")
        try:
            request = AccessRequest.of_review(spec)
        except ValueError as exc:
            raise _bad_request(str(exc)) from None
        self._reviews.append(copy.deepcopy(spec))
        policy = Policy(
            *(
                self.list_objects(kmock.resource(RBAC_GROUP, "v1", plural))
                for plural in ("roles", "clusterroles", "rolebindings", "clusterrolebindings")
            )
        )
        allowed, reason = policy.decide(request)
        return {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "metadata": {},
            "spec": spec,
            "status": {"allowed": allowed, **({"reason": reason} if reason else {})},
        }

    @property
    def access_reviews(self) -> list[JsonObject]:
        """The spec of every SubjectAccessReview asked so far, in order."""
        return list(self._reviews)

    # ---------------------------------------------------------------- request log

    @property
    def request_log(self) -> list[ApiCall]:
        """Every API request served so far, in order, as RBAC sees it.

        Discovery requests (``/api``, ``/apis/...`` without a resource) are not included:
        they are non-resource URLs that every authenticated user may read.
        """
        return list(self._calls)

    def used_permissions(self) -> set[tuple[str, str, str]]:
        """The ``(apiGroup, resource[/subresource], verb)`` triples an RBAC role must grant."""
        return {
            (
                call.group,
                f"{call.resource}/{call.subresource}" if call.subresource else call.resource,
                call.verb,
            )
            for call in self._calls
        }

    def clear_request_log(self) -> None:
        """Forget the requests so far, e.g. to check only what an operator does later."""
        self._calls.clear()

    # ---------------------------------------------------------------- CRDs

    def register_crd(self, manifest: Mapping[str, Any]) -> list[kmock.resource]:
        """Serve the custom resources of an ``apiextensions.k8s.io/v1`` CRD manifest.

        Reads ``spec.group``, the served ``spec.versions`` (with their
        ``subresources.status``), ``spec.names`` (kind, plural, singular, shortNames,
        categories) and ``spec.scope``. The CRD object itself is stored (created, or
        replaced if one of that name exists) so that kopf, kubectl or a test sees it, with
        the ``Established`` condition a real API server would set.
        """
        self._ensure_crd_resource()
        resources = list(_crd_resource_infos(manifest))
        name = _meta(manifest).get("name")
        assert isinstance(name, str)  # checked by _crd_resource_infos
        body = copy.deepcopy(dict(manifest))
        body.setdefault("metadata", {}).pop("resourceVersion", None)
        if self.get_object(CRD_RESOURCE, None, name) is None:
            self.create_object(CRD_RESOURCE, body)
        else:
            self._update(CRD_RESOURCE, None, name, None, lambda _current: body, dry_run=False)
        return resources

    def load_crds(self, *paths: str | pathlib.Path) -> list[kmock.resource]:
        """Register every CRD in these YAML files, or in the ``*.yaml``/``*.yml`` of these folders.

        Other documents in the files are ignored. Returns the registered resources
        (empty if there were no CRDs: the caller decides whether that is an error).
        """
        resources: list[kmock.resource] = []
        for path in map(pathlib.Path, paths):
            files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
            for file in files:
                for document in yaml.safe_load_all(file.read_text(encoding="utf-8")):
                    if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                        resources.extend(self.register_crd(document))
        return resources

    def _ensure_crd_resource(self) -> None:
        if CRD_RESOURCE not in self.resources:
            self.resources[CRD_RESOURCE] = kmock.ResourceInfo(
                kind="CustomResourceDefinition",
                singular="customresourcedefinition",
                namespaced=False,
                verbs=CRD_VERBS,
                shortnames={"crd", "crds"},
                subresources={"status"},
            )

    def _sync_crd(self, name: str, crd: JsonObject | None) -> None:
        """Make the served custom resources follow a CRD that was just written or removed."""
        previous = set(self._crds.pop(name, ()))
        infos = _crd_resource_infos(crd) if crd is not None else {}
        for resource, info in infos.items():
            self.resources[resource] = info
        if crd is not None:
            self._crds[name] = list(infos)
        for resource in previous - set(infos):
            # The API server removes a CRD's objects with it; their finalizers do not run.
            for key, current in list(self._iter_live(resource)):
                self._remove(key, current)
            if resource in self.resources:
                del self.resources[resource]

    def _is_custom(self, resource: kmock.resource) -> bool:
        return any(resource in resources for resources in self._crds.values())

    # ---------------------------------------------------------------- in-process helpers

    @property
    def resource_version(self) -> str:
        """The latest resourceVersion issued (what a list made now would report)."""
        return str(self._last_rv)

    def get_object(self, resource: ResourceRef, namespace: str | None, name: str) -> JsonObject | None:
        """The stored object (a copy), or None if it does not exist (or was deleted)."""
        current = self._live((_as_resource(resource), namespace, name))
        return copy.deepcopy(current) if current is not None else None

    def list_objects(self, resource: ResourceRef, namespace: str | None = None) -> list[JsonObject]:
        """The stored objects of a resource (copies), in one namespace or in all."""
        return [
            copy.deepcopy(obj)
            for (_, obj_namespace, _), obj in self._iter_live(_as_resource(resource))
            if namespace is None or obj_namespace == namespace
        ]

    def create_object(
        self, resource: ResourceRef, body: Mapping[str, Any], namespace: str | None = None
    ) -> JsonObject:
        """Create an object as a POST would (events, resourceVersion, GC), without HTTP."""
        namespace = namespace if namespace is not None else _meta(body).get("namespace")
        return self._create(_as_resource(resource), namespace, copy.deepcopy(dict(body)), dry_run=False)

    def patch_object(
        self,
        resource: ResourceRef,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> JsonObject:
        """Merge-patch an object as a PATCH would, without HTTP.

        This is how a test plays the controllers the emulator does not have, e.g.
        ``patch_object('apps/v1/deployments', ns, name, {'status': {'readyReplicas': 1}},
        subresource='status')``.
        """
        return self._update(
            _as_resource(resource),
            namespace,
            name,
            subresource,
            lambda current: merge_patch(current, patch),
            dry_run=False,
        )

    def delete_object(self, resource: ResourceRef, namespace: str | None, name: str) -> JsonObject:
        """Delete an object as a DELETE would (finalizers, GC), without HTTP."""
        ref = _as_resource(resource)
        key = self._key(ref, self._info(ref), namespace, name)
        result = self._delete(key, propagation="Background")
        self._collect_garbage()
        return result

    # ---------------------------------------------------------------- storage primitives

    def _next_rv(self) -> str:
        self._last_rv += 1
        return str(self._last_rv)

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        if resource not in self.resources:
            raise _not_found(f"the server could not find the requested resource ({resource!r})")
        return self.resources[resource]

    def _key(
        self, resource: kmock.resource, info: kmock.ResourceInfo, namespace: str | None, name: str
    ) -> tuple[kmock.resource, str | None, str]:
        if info.namespaced is True and namespace is None:
            raise _not_found(f"{resource.plural} is namespaced: the request must name a namespace")
        if info.namespaced is False and namespace is not None:
            raise _not_found(f"{resource.plural} is cluster-scoped: the request must not name a namespace")
        return (resource, namespace, name)

    def _live(self, key: tuple[kmock.resource, str | None, str]) -> JsonObject | None:
        if key in self.objects:
            stored = self.objects[key]
            if not stored.deleted:
                return stored.raw
        return None

    def _iter_live(
        self, resource: kmock.resource
    ) -> Iterator[tuple[tuple[kmock.resource, str | None, str], JsonObject]]:
        keys = sorted(
            (key for key in self.objects if key[0] == resource and not self.objects[key].deleted),
            key=lambda key: (key[1] or "", key[2]),
        )
        for key in keys:
            yield key, self.objects[key].raw

    def _store(self, key: tuple[kmock.resource, str | None, str], body: JsonObject, event: str) -> None:
        previous = self._live(key)
        snapshot = copy.deepcopy(body)
        if key in self.objects:
            self.objects[key].history.append(snapshot)
        else:
            self.objects[key] = snapshot
        self._emit(key[0], event, body, previous)
        if key[0] == CRD_RESOURCE:
            self._sync_crd(key[2], body)

    def _remove(self, key: tuple[kmock.resource, str | None, str], current: JsonObject) -> JsonObject:
        final = copy.deepcopy(current)
        final.setdefault("metadata", {})["resourceVersion"] = self._next_rv()
        self.objects[key].delete()
        self._emit(key[0], "DELETED", final, current)
        if key[0] == CRD_RESOURCE:
            self._sync_crd(key[2], None)
        return final

    def _emit(self, resource: kmock.resource, event: str, obj: JsonObject, old: JsonObject | None) -> None:
        rv = int(_meta(obj).get("resourceVersion", self._last_rv))
        self._events[resource].append(_Event(rv, event, copy.deepcopy(obj), copy.deepcopy(old)))
        wakeup = self._wakeups.pop(resource, None)
        if wakeup is not None:
            wakeup.set()

    def _check_type_meta(self, resource: kmock.resource, info: kmock.ResourceInfo, body: JsonObject) -> None:
        expected = {"apiVersion": _api_version(resource), "kind": info.kind}
        for field, value in expected.items():
            if value is None:
                continue
            if field not in body:
                # Built-in types get these from the URL; custom resources must carry them.
                if self._is_custom(resource):
                    raise _bad_request(f"Object '{field}' is missing in the request body")
                body[field] = value
            elif body[field] != value:
                raise _bad_request(f"{field} {body[field]!r} does not match the URL's {value!r}")

    # ---------------------------------------------------------------- verbs

    def _read(
        self, resource: kmock.resource, namespace: str | None, name: str, subresource: str | None
    ) -> JsonObject:
        info = self._info(resource)
        current = self._live(self._key(resource, info, namespace, name))
        if current is None:
            raise _not_found(f'{resource.plural} "{name}" not found')
        if subresource is not None and subresource not in info.subresources:
            raise _not_found(f"{resource.plural}/{subresource} is not served by the emulator")
        return copy.deepcopy(current)

    def _scope(self, path: ApiPath, params: Mapping[str, str], info: kmock.ResourceInfo) -> _Scope:
        if info.namespaced is False and path.namespace is not None:
            raise _not_found(f"{path.plural} is cluster-scoped: the request must not name a namespace")
        return _Scope(
            namespace=path.namespace,
            name=path.name,
            labels=LabelSelector.parse(params.get("labelSelector")),
            fields=FieldSelector.parse(params.get("fieldSelector")),
        )

    def _list(self, path: ApiPath, params: Mapping[str, str]) -> JsonObject:
        info = self._info(path.resource)
        scope = self._scope(path, params, info)
        items = [copy.deepcopy(obj) for _, obj in self._iter_live(path.resource) if scope.matches(obj)]
        return {
            "apiVersion": _api_version(path.resource),
            "kind": f"{info.kind or path.plural.capitalize()}List",
            "metadata": {"resourceVersion": self.resource_version},
            "items": items,
        }

    def _create(
        self, resource: kmock.resource, namespace: str | None, body: Any, *, dry_run: bool
    ) -> JsonObject:
        info = self._info(resource)
        if not isinstance(body, dict):
            raise _bad_request("the request body must be a JSON object")
        obj: JsonObject = copy.deepcopy(body)
        self._check_type_meta(resource, info, obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        if meta.get("resourceVersion"):
            raise _bad_request("resourceVersion should not be set on objects to be created")
        if meta.get("namespace") and namespace and meta["namespace"] != namespace:
            raise _bad_request("the namespace of the object does not match the namespace on the request")
        if info.namespaced is False:
            meta.pop("namespace", None)
        elif namespace := namespace or meta.get("namespace"):
            meta["namespace"] = namespace
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = self._generate_name(resource, namespace, str(meta["generateName"]))
        if not name or not isinstance(name, str):
            raise _invalid("metadata.name: Required value: name or generateName is required")
        key = self._key(resource, info, namespace, name)
        if self._live(key) is not None:
            raise _error(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"):
            meta.pop(field, None)
        meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if "status" in info.subresources:
            obj.pop("status", None)
        if resource == CRD_RESOURCE:
            _crd_resource_infos(obj)  # a broken CRD is a 422, as upstream
            obj["status"] = _established_crd_status(obj)
        if dry_run:
            return obj
        meta["resourceVersion"] = self._next_rv()
        self._store(key, obj, "ADDED")
        self._collect_garbage()
        return copy.deepcopy(obj)

    def _generate_name(self, resource: kmock.resource, namespace: str | None, prefix: str) -> str:
        for _ in range(100):
            name = prefix + "".join(random.choices(_GENERATE_NAME_ALPHABET, k=5))
            if self._live((resource, namespace, name)) is None:
                return name
        raise _error(409, "AlreadyExists", f"could not generate a unique name from {prefix!r}")

    def _update(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        subresource: str | None,
        transform: Callable[[JsonObject], Any],
        *,
        dry_run: bool,
    ) -> JsonObject:
        """Write a new version computed from the current one, with the API server's rules."""
        info = self._info(resource)
        key = self._key(resource, info, namespace, name)
        current = self._live(key)
        if current is None:
            raise _not_found(f'{resource.plural} "{name}" not found')
        candidate = transform(copy.deepcopy(current))
        if not isinstance(candidate, dict):
            raise _invalid("the result of the update is not an object")
        old_meta = _meta(current)
        sent_meta = candidate.get("metadata")
        if sent_meta is not None and not isinstance(sent_meta, dict):
            raise _invalid("metadata must be an object")
        sent_rv = (sent_meta or {}).get("resourceVersion")
        if sent_rv and sent_rv != old_meta.get("resourceVersion"):
            raise _conflict(
                f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again"
            )
        sent_uid = (sent_meta or {}).get("uid")
        if sent_uid and sent_uid != old_meta.get("uid"):
            raise _conflict(
                f"Precondition failed: UID in object meta: {sent_uid}, current: {old_meta.get('uid')}"
            )

        has_status = "status" in info.subresources
        if subresource == "status":
            if not has_status:
                raise _not_found(f"{resource.plural} has no status subresource")
            new = copy.deepcopy(current)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
        elif subresource is not None:
            raise _not_found(f"{resource.plural}/{subresource} is not served by the emulator")
        else:
            new = candidate
            if has_status:  # the main resource ignores .status, the /status one the rest
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
                else:
                    new.pop("status", None)
        self._check_type_meta(resource, info, new)
        if resource == CRD_RESOURCE:
            _crd_resource_infos(new)  # a CRD cannot be updated into a broken one

        meta = new.setdefault("metadata", {})
        for field in ("name", "namespace"):
            if field in meta and meta[field] != old_meta.get(field):
                raise _invalid(f"metadata.{field}: Invalid value: {meta[field]!r}: field is immutable")
        for field in _SERVER_OWNED_METADATA:
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise _invalid(
                    f"metadata.finalizers: Forbidden: no new finalizers can be added if the object "
                    f"is being deleted, found new finalizers {sorted(added)}"
                )
        if _spec_part(new, has_status) != _spec_part(current, has_status):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        meta["resourceVersion"] = old_meta.get("resourceVersion")
        if new == current:
            return copy.deepcopy(current)  # a no-op write: no new resourceVersion, no event
        if dry_run:
            return new
        meta["resourceVersion"] = self._next_rv()
        self._store(key, new, "MODIFIED")
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key, new)
        self._collect_garbage()
        return copy.deepcopy(new)

    def _replace(self, path: ApiPath, body: Any, *, dry_run: bool) -> JsonObject:
        if path.name is None:
            raise _error(405, "MethodNotAllowed", "PUT needs an object name in the URL")
        if not isinstance(body, dict):
            raise _bad_request("the request body must be a JSON object")
        body_name = _meta(body).get("name")
        if body_name is not None and body_name != path.name:
            raise _bad_request(f"the name of the object ({body_name}) does not match the name on the URL")
        return self._update(
            path.resource, path.namespace, path.name, path.subresource, lambda _: body, dry_run=dry_run
        )

    def _patch(self, request: kmock.Request, path: ApiPath, *, dry_run: bool) -> JsonObject:
        assert path.name is not None
        content_type = _header(request, "Content-Type").split(";")[0].strip().lower()
        if content_type == _APPLY_PATCH_TYPE:
            return self._apply(request, path, dry_run=dry_run)
        patch = _json_body(request)
        if content_type in _MERGE_PATCH_TYPES:
            if not isinstance(patch, dict):
                raise _bad_request("a merge patch must be a JSON object")
            return self._update(
                path.resource,
                path.namespace,
                path.name,
                path.subresource,
                lambda current: merge_patch(current, patch),
                dry_run=dry_run,
            )
        if content_type == _JSON_PATCH_TYPE:
            if not isinstance(patch, list):
                raise _bad_request("a JSON patch must be a list of operations")
            return self._update(
                path.resource,
                path.namespace,
                path.name,
                path.subresource,
                lambda current: _json_patch(current, patch),
                dry_run=dry_run,
            )
        raise _error(415, "UnsupportedMediaType", f"the patch type {content_type!r} is not supported")

    def _apply(self, request: kmock.Request, path: ApiPath, *, dry_run: bool) -> JsonObject:
        """Server-side apply, naively: create the object, or merge-patch it with the config."""
        assert path.name is not None
        if not request.params.get("fieldManager"):
            raise _bad_request("PATCH with apply requires a fieldManager")
        try:
            config = yaml.safe_load(request.text)
        except yaml.YAMLError as exc:
            raise _bad_request(f"the applied configuration is not valid YAML: {exc}") from exc
        if not isinstance(config, dict):
            raise _bad_request("the applied configuration must be an object")
        config_name = _meta(config).get("name")
        if config_name is not None and config_name != path.name:
            raise _bad_request(f"the name of the object ({config_name}) does not match the name on the URL")
        info = self._info(path.resource)
        if (
            path.subresource is None
            and self._live(self._key(path.resource, info, path.namespace, path.name)) is None
        ):
            config.setdefault("metadata", {})["name"] = path.name
            created = self._create(path.resource, path.namespace, config, dry_run=dry_run)
            self._created.add(request)
            return created
        return self._update(
            path.resource,
            path.namespace,
            path.name,
            path.subresource,
            lambda current: merge_patch(current, config),
            dry_run=dry_run,
        )

    def _delete_request(self, request: kmock.Request, path: ApiPath) -> JsonObject:
        assert path.name is not None
        options = _DeleteOptions.parse(request)
        key = self._key(path.resource, self._info(path.resource), path.namespace, path.name)
        result = self._delete(
            key, propagation=options.propagation, preconditions=options.preconditions, dry_run=options.dry_run
        )
        self._collect_garbage()
        if self._live(key) is None and not self._is_custom(path.resource) and not options.dry_run:
            # Built-in resources answer an immediate deletion with a Status, custom ones
            # with the object (the official client deserializes accordingly).
            return {
                "apiVersion": "v1",
                "kind": "Status",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": path.name,
                    "group": path.group,
                    "kind": path.plural,
                    "uid": _meta(result).get("uid"),
                },
            }
        return result

    def _delete_collection(self, request: kmock.Request, path: ApiPath) -> JsonObject:
        info = self._info(path.resource)
        scope = self._scope(path, request.params, info)
        options = _DeleteOptions.parse(request)
        victims = [key for key, obj in self._iter_live(path.resource) if scope.matches(obj)]
        items = [
            self._delete(key, propagation=options.propagation, dry_run=options.dry_run) for key in victims
        ]
        self._collect_garbage()
        return {
            "apiVersion": _api_version(path.resource),
            "kind": f"{info.kind or path.plural.capitalize()}List",
            "metadata": {"resourceVersion": self.resource_version},
            "items": items,
        }

    def _delete(
        self,
        key: tuple[kmock.resource, str | None, str],
        *,
        propagation: str,
        preconditions: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> JsonObject:
        resource, _, name = key
        current = self._live(key)
        if current is None:
            raise _not_found(f'{resource.plural} "{name}" not found')
        meta = _meta(current)
        for field in ("uid", "resourceVersion"):
            expected = (preconditions or {}).get(field)
            if expected and expected != meta.get(field):
                raise _conflict(
                    f"Precondition failed: {field} in precondition: {expected}, in object: {meta.get(field)}"
                )
        if dry_run:
            return copy.deepcopy(current)
        if propagation == "Orphan":
            self._orphan_dependents(str(meta.get("uid")))
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return copy.deepcopy(current)  # already being deleted: nothing changes
            new = copy.deepcopy(current)
            new_meta = new["metadata"]
            new_meta["deletionTimestamp"] = _now()
            new_meta["deletionGracePeriodSeconds"] = 0
            new_meta["generation"] = int(meta.get("generation", 1)) + 1
            new_meta["resourceVersion"] = self._next_rv()
            self._store(key, new, "MODIFIED")
            return copy.deepcopy(new)
        return self._remove(key, current)

    def _orphan_dependents(self, owner_uid: str) -> None:
        for key, obj in list(self._all_live()):
            refs = _meta(obj).get("ownerReferences") or []
            kept = [ref for ref in refs if ref.get("uid") != owner_uid]
            if len(kept) != len(refs):
                new = copy.deepcopy(obj)
                if kept:
                    new["metadata"]["ownerReferences"] = kept
                else:
                    del new["metadata"]["ownerReferences"]
                new["metadata"]["resourceVersion"] = self._next_rv()
                self._store(key, new, "MODIFIED")

    def _all_live(self) -> Iterator[tuple[tuple[kmock.resource, str | None, str], JsonObject]]:
        for key in list(self.objects):
            current = self._live(key)
            if current is not None:
                yield key, current

    def _collect_garbage(self) -> None:
        """Delete every object whose owners (by uid) are all gone, until nothing changes.

        This is the garbage collector's background propagation: an owner that is still
        being deleted (finalizers pending) keeps its dependents.
        """
        while True:
            live = list(self._all_live())
            uids = {_meta(obj).get("uid") for _, obj in live}
            orphans = [
                key
                for key, obj in live
                if (refs := _meta(obj).get("ownerReferences"))
                and not _meta(obj).get("deletionTimestamp")
                and all(ref.get("uid") not in uids for ref in refs)
            ]
            if not orphans:
                return
            for key in orphans:
                self._delete(key, propagation="Background")

    # ---------------------------------------------------------------- watch

    def _open_watch(
        self, request: kmock.Request, path: ApiPath, params: Mapping[str, str]
    ) -> AsyncIterator[Any]:
        """Validate the watch and take its starting point now, atomically with the store."""
        info = self._info(path.resource)
        scope = self._scope(path, params, info)
        timeout: float | None = None
        if params.get("timeoutSeconds"):
            try:
                timeout = float(params["timeoutSeconds"])
            except ValueError as exc:
                raise _bad_request(f"invalid timeoutSeconds: {params['timeoutSeconds']!r}") from exc
        since = params.get("resourceVersion") or ""
        send_initial = _is_true(params.get("sendInitialEvents"))
        log = self._events[path.resource]
        initial: list[JsonObject] = []
        if send_initial or since in {"", "0"}:
            # "Get state and start at most recent": the current objects as ADDED, then live.
            initial = [
                {"type": "ADDED", "object": copy.deepcopy(obj)}
                for _, obj in self._iter_live(path.resource)
                if scope.matches(obj)
            ]
            position = len(log)
        elif since.isdigit():
            position = bisect.bisect_right(log, int(since), key=lambda event: event.rv)
        else:
            raise _bad_request(f"invalid resourceVersion: {since!r}")
        if send_initial and _is_true(params.get("allowWatchBookmarks")):
            initial.append(
                {
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": _api_version(path.resource),
                        "kind": info.kind,
                        "metadata": {
                            "resourceVersion": self.resource_version,
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                }
            )
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return self._stream_watch(
            request, path.resource, scope=scope, initial=initial, position=position, deadline=deadline
        )

    async def _stream_watch(
        self,
        request: kmock.Request,
        resource: kmock.resource,
        *,
        scope: _Scope,
        initial: list[JsonObject],
        position: int,
        deadline: float | None,
    ) -> AsyncIterator[Any]:
        yield b""  # send the headers now: the client waits for them before any event
        for initial_event in initial:
            yield initial_event
        loop = asyncio.get_running_loop()
        log = self._events[resource]
        while not self._stopping:
            while position < len(log):
                event = log[position]
                position += 1
                translated = _translate(event, scope)
                if translated is not None:
                    yield translated
            remaining = None if deadline is None else deadline - loop.time()
            if (remaining is not None and remaining <= 0) or _client_gone(request):
                return
            wakeup = self._wakeups.setdefault(resource, asyncio.Event())
            wait = WATCH_POLL_SECONDS if remaining is None else min(WATCH_POLL_SECONDS, remaining)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), wait)


def _translate(event: _Event, scope: _Scope) -> JsonObject | None:
    """What a watch with this scope sees of an event (selectors can turn MODIFIED into
    ADDED or DELETED, as the API server's watch cache does)."""
    now = scope.matches(event.object)
    if event.type != "MODIFIED":
        return {"type": event.type, "object": event.object} if now else None
    before = event.old is not None and scope.matches(event.old)
    if now and before:
        return {"type": "MODIFIED", "object": event.object}
    if now:
        return {"type": "ADDED", "object": event.object}
    if before:
        return {"type": "DELETED", "object": event.object}
    return None


def _client_gone(request: kmock.Request) -> bool:
    raw = request._raw_request
    transport = raw.transport if raw is not None else None
    return transport is None or transport.is_closing()


def _spec_part(obj: Mapping[str, Any], has_status: bool) -> JsonObject:
    """What ``generation`` tracks: everything but metadata (and status, if a subresource)."""
    return {
        key: value for key, value in obj.items() if key != "metadata" and not (has_status and key == "status")
    }


def _crd_resource_infos(crd: Mapping[str, Any]) -> dict[kmock.resource, kmock.ResourceInfo]:
    """The served resources of a CRD manifest; a 422 (as upstream) if it is malformed."""
    if crd.get("apiVersion") != "apiextensions.k8s.io/v1" or crd.get("kind") != "CustomResourceDefinition":
        raise _invalid("not an apiextensions.k8s.io/v1 CustomResourceDefinition")
    spec = crd.get("spec")
    if not isinstance(spec, dict):
        raise _invalid("spec: Required value")
    group, names, versions = spec.get("group"), spec.get("names"), spec.get("versions")
    if not isinstance(group, str) or not group:
        raise _invalid("spec.group: Required value")
    if not isinstance(names, dict) or not names.get("plural") or not names.get("kind"):
        raise _invalid("spec.names.plural, spec.names.kind: Required value")
    if not isinstance(versions, list) or not versions:
        raise _invalid("spec.versions: Required value")
    plural, kind = str(names["plural"]), str(names["kind"])
    expected_name = f"{plural}.{group}"
    if _meta(crd).get("name") != expected_name:
        raise _invalid(
            f"metadata.name: Invalid value: must be spec.names.plural+'.'+spec.group: {expected_name!r}"
        )
    scope = spec.get("scope", "Namespaced")
    if scope not in {"Namespaced", "Cluster"}:
        raise _invalid(f"spec.scope: Unsupported value: {scope!r}")
    infos: dict[kmock.resource, kmock.ResourceInfo] = {}
    for version in versions:
        if not isinstance(version, dict) or not version.get("name"):
            raise _invalid("spec.versions[].name: Required value")
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or {}
        infos[kmock.resource(group, str(version["name"]), plural)] = kmock.ResourceInfo(
            kind=kind,
            singular=str(names.get("singular") or kind.lower()),
            namespaced=scope == "Namespaced",
            verbs=CRD_VERBS,
            shortnames=set(names.get("shortNames") or ()),
            categories=set(names.get("categories") or ()),
            subresources={"status"} if "status" in subresources else set(),
        )
    return infos


def _established_crd_status(crd: Mapping[str, Any]) -> JsonObject:
    """The status the apiextensions server gives a valid CRD within a moment of creation."""
    now = _now()
    conditions: Iterable[tuple[str, str]] = (
        ("NamesAccepted", "no conflicts found"),
        ("Established", "the initial names have been accepted"),
    )
    return {
        "acceptedNames": copy.deepcopy(crd["spec"]["names"]),
        "storedVersions": [v["name"] for v in crd["spec"]["versions"] if v.get("storage")],
        "conditions": [
            {"type": kind, "status": "True", "reason": kind, "message": message, "lastTransitionTime": now}
            for kind, message in conditions
        ],
    }
