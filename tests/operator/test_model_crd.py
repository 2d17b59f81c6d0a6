"""The Model CRD generated from models.Model: names, printer columns, and a schema that
rejects what the model rejects."""

from __future__ import annotations

from cadenza_operator.crds import build_crds


def test_model_crd_names_and_columns() -> None:
    crd = next(c for c in build_crds() if c["spec"]["names"]["kind"] == "Model")
    assert crd["metadata"]["name"] == "models.cadenza.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["mdl"]
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Provider", "Model", "Requests", "Tokens", "Per", "Base-URL", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["baseURL", "model"]
    assert spec["properties"]["limits"]["properties"]["requests"]["minimum"] == 1
    key = spec["properties"]["apiKey"]["properties"]["secretKeyRef"]
    assert set(key["properties"]) == {"name", "key"}  # a reference: no field holds a value
