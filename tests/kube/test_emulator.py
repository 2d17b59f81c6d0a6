"""The Kubernetes API emulator itself, over real HTTP with the official ``kubernetes`` client.

The client blocks, and the emulator serves from the test's own event loop, so every
client call runs in a worker thread (``asyncio.to_thread``). Watches are bounded by
``timeoutSeconds`` (the server ends them) and, as a safety net, by a client-side timeout.
"""

from __future__ import annotations

import asyncio
import copy
import json
import pathlib
from collections.abc import Callable
from typing import Any

import kopf
import kubernetes.client
import kubernetes.config
import kubernetes.watch
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from .emulator import CRD_RESOURCE, KubeEmulator
from .fixtures import obj, wait_for

GROUP, VERSION, PLURAL = "test.cadenza.dev", "v1", "widgets"
WIDGETS = f"{GROUP}/{VERSION}/{PLURAL}"
NS = "default"
SAFETY_TIMEOUT = 20  # seconds; only so that a broken emulator fails a test instead of hanging it

WIDGETS_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": PLURAL, "singular": "widget", "shortNames": ["wd"]},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


async def call(fn: Callable[..., object], /, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking client call off the loop the emulator serves from.

    Typed ``Any`` on purpose: the client's models make every field optional and its
    custom-object calls return ``object``; the tests' assertions do the checking.
    """
    return await asyncio.to_thread(fn, *args, **kwargs)


def widget(name: str, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": name}, **extra}


def configmap(name: str, labels: dict[str, str] | None = None, **metadata: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}, **metadata}, "data": {"key": "value"}}


@pytest.fixture
def core(kube_api_client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kube_api_client)


@pytest.fixture
def custom(
    kube_api_client: kubernetes.client.ApiClient, kube_emulator: KubeEmulator
) -> kubernetes.client.CustomObjectsApi:
    kube_emulator.register_crd(WIDGETS_CRD)
    return kubernetes.client.CustomObjectsApi(kube_api_client)


def collect_watch(list_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
    """(type, name) of every event until the server ends the watch (timeoutSeconds)."""
    events = kubernetes.watch.Watch().stream(  # type: ignore[no-untyped-call]
        list_fn, *args, _request_timeout=SAFETY_TIMEOUT, **kwargs
    )
    return [(event["type"], event["raw_object"]["metadata"]["name"]) for event in events]


async def test_create_answers_201_with_server_set_metadata(core: kubernetes.client.CoreV1Api) -> None:
    created, status, _headers = await call(
        core.create_namespaced_config_map_with_http_info, NS, configmap("one")
    )
    assert status == 201
    meta = created.metadata
    assert meta.uid and meta.resource_version and meta.resource_version.isdigit()
    assert meta.creation_timestamp is not None
    assert meta.namespace == NS

    generated = await call(core.create_namespaced_config_map, NS, {"metadata": {"generateName": "gen-"}})
    assert generated.metadata.name.startswith("gen-") and len(generated.metadata.name) > len("gen-")
    assert int(generated.metadata.resource_version) > int(meta.resource_version)

    with pytest.raises(ApiException) as duplicate:
        await call(core.create_namespaced_config_map, NS, configmap("one"))
    assert duplicate.value.status == 409


async def test_stale_resource_version_conflicts(core: kubernetes.client.CoreV1Api) -> None:
    created = await call(core.create_namespaced_config_map, NS, configmap("cm"))
    stale = created.metadata.resource_version

    fresh = await call(
        core.patch_namespaced_config_map,
        "cm",
        NS,
        {"metadata": {"resourceVersion": stale}, "data": {"key": "2"}},
    )
    assert fresh.data == {"key": "2"}
    assert int(fresh.metadata.resource_version) > int(stale)

    with pytest.raises(ApiException) as conflict:
        await call(
            core.patch_namespaced_config_map,
            "cm",
            NS,
            {"metadata": {"resourceVersion": stale}, "data": {"key": "3"}},
        )
    assert conflict.value.status == 409

    # kopf's finalizer writes: a JSON patch guarded by a test op on the resourceVersion.
    guarded = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": stale},
        {"op": "replace", "path": "/data/key", "value": "4"},
    ]
    with pytest.raises(ApiException) as unprocessable:
        await call(core.patch_namespaced_config_map, "cm", NS, guarded)
    assert unprocessable.value.status == 422
    guarded[0]["value"] = fresh.metadata.resource_version
    assert (await call(core.patch_namespaced_config_map, "cm", NS, guarded)).data == {"key": "4"}

    # A write that changes nothing issues no new resourceVersion.
    current = await call(core.read_namespaced_config_map, "cm", NS)
    same = await call(core.patch_namespaced_config_map, "cm", NS, {"data": {"key": "4"}})
    assert same.metadata.resource_version == current.metadata.resource_version


async def test_status_subresource_isolates_spec_and_status(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    created = await call(
        custom.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
        widget("w", spec={"size": 1}, status={"phase": "Forged"}),
    )  # fmt: skip
    assert "status" not in created  # dropped on create, as by the API server
    assert created["metadata"]["generation"] == 1

    main = await call(
        custom.patch_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w",
        {"spec": {"size": 2}, "status": {"phase": "Ignored"}},
    )  # fmt: skip
    assert main["spec"] == {"size": 2}
    assert "status" not in main
    assert main["metadata"]["generation"] == 2

    status = await call(
        custom.patch_namespaced_custom_object_status, GROUP, VERSION, NS, PLURAL, "w",
        {"spec": {"size": 99}, "status": {"phase": "Ready"}},
    )  # fmt: skip
    assert status["status"] == {"phase": "Ready"}
    assert status["spec"] == {"size": 2}
    assert status["metadata"]["generation"] == 2  # status writes do not bump the generation

    replaced = await call(
        custom.replace_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w",
        {**widget("w", spec={"size": 3}), "status": {"phase": "IgnoredToo"}},
    )  # fmt: skip
    assert replaced["spec"] == {"size": 3}
    assert replaced["status"] == {"phase": "Ready"}


async def test_label_and_field_selectors_filter_lists(core: kubernetes.client.CoreV1Api) -> None:
    for name, labels in [
        ("a", {"app": "x", "tier": "web"}),
        ("b", {"app": "x"}),
        ("c", {"app": "y", "tier": "db"}),
    ]:
        await call(core.create_namespaced_config_map, NS, configmap(name, labels))

    async def names(**selectors: str) -> list[str]:
        listed = await call(core.list_namespaced_config_map, NS, **selectors)
        return [item.metadata.name for item in listed.items]

    assert await names(label_selector="app=x") == ["a", "b"]
    assert await names(label_selector="app!=x") == ["c"]
    assert await names(label_selector="app=x,tier") == ["a"]
    assert await names(label_selector="!tier") == ["b"]
    assert await names(label_selector="tier in (web, db)") == ["a", "c"]
    assert await names(label_selector="tier notin (web)") == ["b", "c"]
    assert await names(field_selector="metadata.name=b") == ["b"]
    assert await names(field_selector="metadata.name!=b", label_selector="app=x") == ["a"]
    with pytest.raises(ApiException) as bad:
        await names(label_selector="app in x")
    assert bad.value.status == 400


async def test_list_has_kind_and_the_current_resource_version(
    core: kubernetes.client.CoreV1Api, kube_emulator: KubeEmulator
) -> None:
    await call(core.create_namespaced_config_map, NS, configmap("a"))
    raw = await call(core.list_namespaced_config_map, NS, _preload_content=False)
    listed = raw.json()
    assert listed["kind"] == "ConfigMapList"
    assert listed["apiVersion"] == "v1"
    assert listed["metadata"]["resourceVersion"] == kube_emulator.resource_version


async def test_watch_resumes_after_a_resource_version(core: kubernetes.client.CoreV1Api) -> None:
    await call(core.create_namespaced_config_map, NS, configmap("before"))
    listed = await call(core.list_namespaced_config_map, NS)
    since = listed.metadata.resource_version

    await call(core.create_namespaced_config_map, NS, configmap("after"))
    await call(core.patch_namespaced_config_map, "before", NS, {"data": {"key": "changed"}})
    await call(core.delete_namespaced_config_map, "after", NS)

    resumed = await call(
        collect_watch, core.list_namespaced_config_map, NS, resource_version=since, timeout_seconds=1
    )
    assert resumed == [("ADDED", "after"), ("MODIFIED", "before"), ("DELETED", "after")]

    # Without a resourceVersion: the current state as ADDED, then nothing (no history).
    fresh = await call(collect_watch, core.list_namespaced_config_map, NS, timeout_seconds=1)
    assert fresh == [("ADDED", "before")]


async def test_watch_streams_live_events_matching_its_selector(
    core: kubernetes.client.CoreV1Api, kube_emulator: KubeEmulator
) -> None:
    watch = asyncio.create_task(
        call(collect_watch, core.list_namespaced_config_map, NS, label_selector="app=x", timeout_seconds=3)
    )
    await wait_for(lambda: ("watch", "", "configmaps", None, NS) in kube_emulator.request_log)
    await call(core.create_namespaced_config_map, NS, configmap("in", {"app": "x"}))
    await call(core.create_namespaced_config_map, NS, configmap("out", {"app": "y"}))
    await call(core.patch_namespaced_config_map, "in", NS, {"metadata": {"labels": {"app": "z"}}})
    await call(core.patch_namespaced_config_map, "out", NS, {"metadata": {"labels": {"app": "x"}}})
    # Leaving and entering the selection look like deletion and creation to the watcher.
    assert await watch == [("ADDED", "in"), ("DELETED", "in"), ("ADDED", "out")]


async def test_watch_sends_initial_events_then_a_bookmark(kube_emulator: KubeEmulator) -> None:
    kube_emulator.create_object("v1/configmaps", configmap("existing"), namespace=NS)
    params = {
        "watch": "true",
        "sendInitialEvents": "true",
        "resourceVersionMatch": "NotOlderThan",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "1",  # the server ends the stream, so reading it to its end terminates
    }
    async with kube_emulator.get(f"/api/v1/namespaces/{NS}/configmaps", params=params) as response:
        lines = (await asyncio.wait_for(response.read(), SAFETY_TIMEOUT)).splitlines()
    events = [json.loads(line) for line in lines]
    assert [event["type"] for event in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


async def test_dry_run_changes_nothing(core: kubernetes.client.CoreV1Api) -> None:
    dry = await call(core.create_namespaced_config_map, NS, configmap("dry"), dry_run="All")
    assert dry.metadata.name == "dry"
    with pytest.raises(ApiException) as absent:
        await call(core.read_namespaced_config_map, "dry", NS)
    assert absent.value.status == 404

    real = await call(core.create_namespaced_config_map, NS, configmap("real"))
    await call(core.patch_namespaced_config_map, "real", NS, {"data": {"key": "dry"}}, dry_run="All")
    await call(core.delete_namespaced_config_map, "real", NS, dry_run="All")
    after = await call(core.read_namespaced_config_map, "real", NS)
    assert (after.data, after.metadata.resource_version) == (real.data, real.metadata.resource_version)


async def test_delete_collection_and_orphan_propagation(core: kubernetes.client.CoreV1Api) -> None:
    owner = await call(core.create_namespaced_config_map, NS, configmap("owner", {"app": "x"}))
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    await call(
        core.create_namespaced_config_map, NS, configmap("child", {"app": "y"}, ownerReferences=[reference])
    )
    await call(core.create_namespaced_config_map, NS, configmap("other", {"app": "x"}))

    await call(
        core.delete_collection_namespaced_config_map, NS, label_selector="app=x", propagation_policy="Orphan"
    )
    remaining = await call(core.list_namespaced_config_map, NS)
    assert [(item.metadata.name, item.metadata.owner_references) for item in remaining.items] == [
        ("child", None)
    ]


async def test_a_test_plays_the_missing_controllers(
    kube_api_client: kubernetes.client.ApiClient, kube_emulator: KubeEmulator
) -> None:
    apps = kubernetes.client.AppsV1Api(kube_api_client)
    deployment = {
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"app": "d"}},
            "template": {
                "metadata": {"labels": {"app": "d"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        },
    }
    await call(apps.create_namespaced_deployment, NS, deployment)
    assert (await call(apps.read_namespaced_deployment, "d", NS)).status is None  # no controller ran

    kube_emulator.patch_object(
        "apps/v1/deployments", NS, "d", {"status": {"readyReplicas": 1}}, subresource="status"
    )
    assert (await call(apps.read_namespaced_deployment_status, "d", NS)).status.ready_replicas == 1


async def test_owner_reference_garbage_collection(core: kubernetes.client.CoreV1Api) -> None:
    owner1 = await call(core.create_namespaced_config_map, NS, configmap("owner1"))
    owner2 = await call(core.create_namespaced_config_map, NS, configmap("owner2"))

    def owned_by(*owners: Any) -> list[dict[str, str]]:
        return [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": o.metadata.name, "uid": o.metadata.uid}
            for o in owners
        ]

    await call(core.create_namespaced_config_map, NS, configmap("only", ownerReferences=owned_by(owner1)))
    await call(
        core.create_namespaced_config_map, NS, configmap("both", ownerReferences=owned_by(owner1, owner2))
    )

    await call(core.delete_namespaced_config_map, "owner1", NS)
    with pytest.raises(ApiException) as gone:
        await call(core.read_namespaced_config_map, "only", NS)
    assert gone.value.status == 404
    assert (await call(core.read_namespaced_config_map, "both", NS)).metadata.name == "both"  # owner2 remains

    await call(core.delete_namespaced_config_map, "owner2", NS)
    with pytest.raises(ApiException) as gone_too:
        await call(core.read_namespaced_config_map, "both", NS)
    assert gone_too.value.status == 404


async def test_finalizer_blocks_deletion_until_removed(custom: kubernetes.client.CustomObjectsApi) -> None:
    body = widget("w")
    body["metadata"]["finalizers"] = ["test.cadenza.dev/cleanup"]
    await call(custom.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, body)

    await call(custom.delete_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w")
    deleting = await call(custom.get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w")
    assert deleting["metadata"]["deletionTimestamp"]

    with pytest.raises(ApiException) as forbidden:
        await call(
            custom.patch_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w",
            {"metadata": {"finalizers": ["test.cadenza.dev/cleanup", "another/one"]}},
        )  # fmt: skip
    assert forbidden.value.status == 422

    await call(
        custom.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        PLURAL,
        "w",
        {"metadata": {"finalizers": None}},
    )
    with pytest.raises(ApiException) as gone:
        await call(custom.get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w")
    assert gone.value.status == 404


async def test_request_log_records_rbac_verbs(
    custom: kubernetes.client.CustomObjectsApi, core: kubernetes.client.CoreV1Api, kube_emulator: KubeEmulator
) -> None:
    await call(custom.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, widget("w"))
    await call(custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL)
    await call(collect_watch, custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, timeout_seconds=1)
    await call(custom.get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w")
    await call(
        custom.patch_namespaced_custom_object_status, GROUP, VERSION, NS, PLURAL, "w", {"status": {"x": 1}}
    )
    await call(custom.replace_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w", widget("w"))
    await call(custom.delete_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w")
    with pytest.raises(ApiException):
        await call(core.read_namespaced_config_map, "missing", "elsewhere")
    await call(core.read_namespace, NS)

    assert kube_emulator.request_log == [
        ("create", GROUP, PLURAL, None, NS),
        ("list", GROUP, PLURAL, None, NS),
        ("watch", GROUP, PLURAL, None, None),
        ("get", GROUP, PLURAL, None, NS),
        ("patch", GROUP, PLURAL, "status", NS),
        ("update", GROUP, PLURAL, None, NS),
        ("delete", GROUP, PLURAL, None, NS),
        ("get", "", "configmaps", None, "elsewhere"),  # failed requests need permissions too
        ("get", "", "namespaces", None, NS),  # a Namespace is authorized as "in" itself
    ]
    assert (GROUP, f"{PLURAL}/status", "patch") in kube_emulator.used_permissions()


async def test_crds_created_over_http_serve_their_resources(
    kube_api_client: kubernetes.client.ApiClient, kube_emulator: KubeEmulator
) -> None:
    extensions = kubernetes.client.ApiextensionsV1Api(kube_api_client)
    custom = kubernetes.client.CustomObjectsApi(kube_api_client)
    crd = await call(extensions.create_custom_resource_definition, copy.deepcopy(WIDGETS_CRD))
    assert {c.type: c.status for c in crd.status.conditions}["Established"] == "True"

    await call(custom.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, widget("w"))
    assert obj(kube_emulator, WIDGETS, NS, "w") is not None

    await call(extensions.delete_custom_resource_definition, f"{PLURAL}.{GROUP}")
    assert obj(kube_emulator, WIDGETS, NS, "w") is None  # a CRD takes its objects with it
    with pytest.raises(ApiException) as unserved:
        await call(custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL)
    assert unserved.value.status == 404


async def test_load_crds_registers_crds_from_yaml(
    tmp_path: pathlib.Path, kube_emulator: KubeEmulator
) -> None:
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "not-a-crd"}}
    (tmp_path / "widgets.yaml").write_text(yaml.safe_dump_all([WIDGETS_CRD, other]), encoding="utf-8")
    assert kube_emulator.load_crds(tmp_path) == [kube_emulator.resource(WIDGETS)]
    info = kube_emulator.resources[WIDGETS]
    assert (info.kind, info.namespaced, info.subresources, info.shortnames) == (
        "Widget",
        True,
        {"status"},
        {"wd"},
    )
    assert obj(kube_emulator, CRD_RESOURCE, None, f"{PLURAL}.{GROUP}") is not None


async def test_the_project_crds_are_served_and_discoverable(
    cadenza_crds: list[Any], kube_api_client: kubernetes.client.ApiClient
) -> None:
    assert {(r.group, r.version, r.plural) for r in cadenza_crds} == {
        ("cadenza.dev", "v1alpha1", plural) for plural in ("agents", "models", "workflows", "workflowruns")
    }
    custom = kubernetes.client.CustomObjectsApi(kube_api_client)
    discovered = await call(custom.get_api_resources, "cadenza.dev", "v1alpha1")
    names = {resource.name: resource for resource in discovered.resources}
    assert {"agents", "agents/status", "workflows", "workflowruns", "workflowruns/status"} <= set(names)
    assert (names["agents"].kind, names["agents"].namespaced) == ("Agent", True)
    core_discovery = await call(kubernetes.client.CoreV1Api(kube_api_client).get_api_resources)
    assert core_discovery.group_version == "v1"  # kmock says "/v1"

    agent = {"apiVersion": "cadenza.dev/v1alpha1", "kind": "Agent", "metadata": {"name": "a"}, "spec": {}}
    await call(custom.create_namespaced_custom_object, "cadenza.dev", "v1alpha1", NS, "agents", agent)
    without_kind = {"metadata": {"name": "b"}, "spec": {}}
    with pytest.raises(ApiException) as bad:  # custom resources must name their kind, as upstream
        await call(
            custom.create_namespaced_custom_object, "cadenza.dev", "v1alpha1", NS, "agents", without_kind
        )
    assert bad.value.status == 400


async def test_namespaces_are_served(core: kubernetes.client.CoreV1Api) -> None:
    listed = await call(core.list_namespace)
    assert {"default", "kube-system"} <= {item.metadata.name for item in listed.items}
    await call(core.create_namespace, {"metadata": {"name": "team"}})
    assert (await call(core.read_namespace, "team")).metadata.uid
    await call(core.delete_namespace, "team")
    with pytest.raises(ApiException) as gone:
        await call(core.read_namespace, "team")
    assert gone.value.status == 404


async def test_server_side_apply_creates_then_merges(core: kubernetes.client.CoreV1Api) -> None:
    def apply(data: dict[str, str]) -> tuple[Any, int, Any]:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": data}
        return core.patch_namespaced_config_map_with_http_info(
            "applied", NS, body, field_manager="test", _content_type="application/apply-patch+yaml"
        )

    created, created_status, _ = await call(apply, {"a": "1"})
    assert created_status == 201
    updated, updated_status, _ = await call(apply, {"b": "2"})
    assert updated_status == 200
    assert updated.data == {"a": "1", "b": "2"}  # naive: a field left out of the config is not removed
    assert updated.metadata.uid == created.metadata.uid


async def test_a_kopf_operator_reconciles_and_finalizes(
    kube_emulator: KubeEmulator, kubeconfig: pathlib.Path, kube_api_client: kubernetes.client.ApiClient
) -> None:
    kube_emulator.register_crd(WIDGETS_CRD)
    custom = kubernetes.client.CustomObjectsApi(kube_api_client)
    core = kubernetes.client.CoreV1Api(kube_api_client)

    registry = kopf.OperatorRegistry()  # a fresh one: nothing leaks in from other tests
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = "test.cadenza.dev/cleanup"
    settings.watching.server_timeout = 10  # exercise the server ending watches
    cleaned_up: list[str] = []

    kopf.on.login(registry=registry)(kopf.login_with_kubeconfig)

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="widget_create")
    async def widget_create(body: kopf.Body, name: str, **_: Any) -> dict[str, str]:
        child: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-config"},
        }
        kopf.adopt(child, owner=body)
        await call(core.create_namespaced_config_map, child["metadata"]["namespace"], child)
        kopf.info(body, reason="Reconciled", message="the ConfigMap is created")  # posted as an Event
        return {"configMap": child["metadata"]["name"]}

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="widget_delete")
    async def widget_delete(name: str, **_: Any) -> None:
        cleaned_up.append(name)

    stop, ready = asyncio.Event(), asyncio.Event()
    operator = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            clusterwide=True,
            standalone=True,
            stop_flag=stop,
            ready_flag=ready,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), SAFETY_TIMEOUT)
        created = await call(custom.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, widget("w"))

        child = await wait_for(lambda: obj(kube_emulator, "v1/configmaps", NS, "w-config"))
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Widget", "w", created["metadata"]["uid"])

        def reconciled() -> dict[str, Any] | None:
            # kopf stores a handler's result in the status, under the handler's id.
            current = obj(kube_emulator, WIDGETS, NS, "w")
            return current if current and "widget_create" in current.get("status", {}) else None

        reconciled_widget = await wait_for(reconciled)
        assert reconciled_widget["status"]["widget_create"] == {"configMap": "w-config"}
        assert "test.cadenza.dev/cleanup" in reconciled_widget["metadata"]["finalizers"]
        [event] = await wait_for(lambda: kube_emulator.list_objects("v1/events", NS))
        assert (event["reason"], event["involvedObject"]["uid"]) == ("Reconciled", created["metadata"]["uid"])

        await call(custom.delete_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "w")
        await wait_for(lambda: obj(kube_emulator, WIDGETS, NS, "w") is None)
        assert cleaned_up == ["w"]
        assert obj(kube_emulator, "v1/configmaps", NS, "w-config") is None  # collected with its owner
    finally:
        stop.set()
        await asyncio.wait_for(operator, SAFETY_TIMEOUT)
