"""An Agent's `spec.podTemplate` against the Kubernetes schema, before anything is applied.

The CRD keeps podTemplate free-form (x-kubernetes-preserve-unknown-fields), so without
this a misspelt field (`nodeSelectr`) or a wrong type (`periodSeconds: "ten"`) would pass
`cadenza validate` and only fail when the operator's Deployment is rejected by the API
server. The schema is the one the kubernetes client is generated from: each model class's
`openapi_types` and `attribute_map` (JSON name -> Python attribute) say which fields an
object has and what type each holds, so the walk needs no cluster and no download.
Required fields are not checked: a podTemplate is partial by design (Cadenza supplies the
container, its command and image).
"""

from __future__ import annotations

from typing import Any

_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "bytes": (str,),
    "object": (object,),  # int-or-string (probe ports) and free-form values
}

_QUANTITIES = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests")}
"""Maps of quantities: `cpu: 1` is as valid as `cpu: "1"` (the client types them str)."""
_QUANTITY_FIELDS = {("V1EmptyDirVolumeSource", "sizeLimit")}


def pod_template_schema_errors(template: Any) -> list[tuple[str, str]]:
    """(field path, message) for each field of `template` that a Kubernetes
    PodTemplateSpec does not have, or whose value has the wrong type."""
    return _check(template, "V1PodTemplateSpec", "")


def _check(value: Any, type_name: str, path: str) -> list[tuple[str, str]]:
    if value is None:  # `field:` with no value: the API server treats it as unset
        return []
    lowered = type_name.lower()
    if lowered.startswith("list["):
        if not isinstance(value, list):
            return [(path, f"expected a list, got {_kind(value)}")]
        inner = type_name[5:-1]
        return [e for i, item in enumerate(value) for e in _check(item, inner, f"{path}[{i}]")]
    if lowered.startswith("dict["):
        if not isinstance(value, dict):
            return [(path, f"expected a mapping, got {_kind(value)}")]
        inner = type_name[5:-1].split(",", 1)[1].strip()
        return [e for key, item in value.items() for e in _check(item, inner, _join(path, str(key)))]
    if type_name in _PRIMITIVES:
        expected = _PRIMITIVES[type_name]
        # bool is an int in Python, not in Kubernetes: `replicas: true` is a type error.
        if isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected):
            return []
        return [(path, f"expected {_TYPE_WORDS.get(type_name, type_name)}, got {_kind(value)}")]
    from kubernetes import client

    cls = getattr(client.models, type_name, None)
    if cls is None:  # a type this client version does not describe: nothing to check it against
        return []
    if not isinstance(value, dict):
        return [(path, f"expected a mapping ({type_name.removeprefix('V1')}), got {_kind(value)}")]
    attributes = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    errors: list[tuple[str, str]] = []
    for key, item in value.items():
        where = _join(path, str(key))
        attr = attributes.get(key)
        if attr is None:
            errors.append((where, f"unknown field (not in Kubernetes {type_name.removeprefix('V1')})"))
            continue
        if (type_name, key) in _QUANTITIES:
            errors += _quantities(item, where)
        elif (type_name, key) in _QUANTITY_FIELDS:
            errors += _quantities({key: item}, path)
        else:
            errors += _check(item, cls.openapi_types[attr], where)
    return errors


def _quantities(value: Any, path: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        return [(path, f"expected a mapping of quantities, got {_kind(value)}")]
    return [
        (_join(path, str(key)), f"expected a quantity such as 500m or 1Gi, got {_kind(item)}")
        for key, item in value.items()
        if isinstance(item, bool) or not isinstance(item, (str, int, float))
    ]


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
