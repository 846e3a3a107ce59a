"""Our claim specs validate against the CDI project's JSON schema (main and v1.1.0 copies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator  # type: ignore[import-untyped]
from referencing import Registry
from referencing.jsonschema import DRAFT7

from cdi.store import CdiStore
from tests.ground.driverroot import FakeDriverRoot
from tests.unit.cdi.claimspec import build_claim_spec
from tests.unit.cdi.conftest import UID

SCHEMA_ROOT = Path(__file__).resolve().parents[2] / "data" / "cdi-schema"


def validator(schema_dir: Path) -> Draft7Validator:
    # schema.json refers to "defs.json#/definitions/..." relative to itself.
    base = schema_dir.as_uri() + "/"
    schema: dict[str, Any] = json.loads((schema_dir / "schema.json").read_text())
    defs = json.loads((schema_dir / "defs.json").read_text())
    registry: Registry[Any] = Registry().with_resources(
        [
            (base + "schema.json", DRAFT7.create_resource(schema)),
            (base + "defs.json", DRAFT7.create_resource(defs)),
        ]
    )
    return Draft7Validator({**schema, "$id": base + "schema.json"}, registry=registry)


@pytest.fixture(params=["main", "v1.1.0"])
def schema(request: pytest.FixtureRequest) -> Draft7Validator:
    return validator(SCHEMA_ROOT if request.param == "main" else SCHEMA_ROOT / "v1.1.0")


def test_schema_itself_rejects_bad_testdata(schema: Draft7Validator) -> None:
    # Proves the validator is wired up (refs resolved) and can fail.
    for good in sorted((SCHEMA_ROOT / "testdata" / "good").glob("*.json")):
        assert not list(schema.iter_errors(json.loads(good.read_text()))), good.name
    bad = json.loads((SCHEMA_ROOT / "testdata" / "bad" / "explicit-empty.json").read_text())
    assert list(schema.iter_errors(bad))
    no_path = {"deviceNodes": [{"hostPath": "/dev/x"}]}  # a deviceNode needs "path" (checked via defs.json)
    broken_ref = {
        "cdiVersion": "0.5.0",
        "kind": "a.com/b",
        "devices": [{"name": "x", "containerEdits": no_path}],
    }
    assert list(schema.iter_errors(broken_ref))


def test_written_claim_spec_validates(
    tmp_path: Path, fake_root: FakeDriverRoot, schema: Draft7Validator
) -> None:
    store = CdiStore(tmp_path / "cdi")
    path = store.write_claim_spec(UID, build_claim_spec(fake_root, UID))
    doc = json.loads(path.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in schema.iter_errors(doc)]
    assert errors == []
    assert doc["cdiVersion"] == "0.5.0"
    assert len(doc["devices"]) == 2
