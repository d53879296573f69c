"""GET /openapi.json and the compatibility table: the document is OpenAPI 3.1 in structure, names
every route the app serves and nothing else (with and without the optional blueprints), says
what the server really accepts and refuses on chat and completions, and the committed table
(docs/openai_compatibility.md) is the one the code writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from lmref.lab.api_docs import compatibility_table, full_app
from lmref.serving.app import ModelSpec, ServingConfig, create_app
from lmref.serving.auth import SCOPES
from lmref.serving.openai_fields import fields_of
from lmref.serving.openapi import openapi_document, openapi_path

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"get", "put", "post", "delete", "patch"}


def bare_app(*blueprints):
    """An app with no model loaded, plus optional blueprints registered as build_app would."""
    app = create_app(ServingConfig(models=[ModelSpec("m", "unused")], api_keys=["sk-t"]), False)
    for bp in blueprints:
        app.register_blueprint(bp)
    return app


def refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for v in node.values():
            yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def check_structure(doc: dict) -> None:
    """What openapi-spec-validator would check first (not installed): the required objects,
    unique operation ids, every $ref resolved, each schema valid JSON Schema 2020-12 (OpenAPI
    3.1's dialect), security naming a declared scheme and a known scope."""
    assert doc["openapi"].startswith("3.1") and doc["info"]["title"] and doc["info"]["version"]
    ids = []
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        for method, op in item.items():
            assert method in METHODS, (path, method)
            ids.append(op["operationId"])
            assert op["responses"] and all(k.isdigit() for k in op["responses"])
            for p in op.get("parameters", []):
                assert p["in"] in ("path", "query") and (p["in"] == "query" or p["required"])
                assert "{" + p["name"] + "}" in path or p["in"] == "query"
                Draft202012Validator.check_schema(p["schema"])
            for media in op.get("requestBody", {}).get("content", {}).values():
                Draft202012Validator.check_schema(media["schema"])
            for requirement in op["security"]:
                for scheme, scopes in requirement.items():
                    assert scheme in doc["components"]["securitySchemes"]
                    assert set(scopes) <= set(SCOPES)
    assert len(ids) == len(set(ids))
    for ref in set(refs(doc)):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]  # a KeyError: a dangling $ref


@pytest.fixture(scope="module")
def optional_blueprints():
    from lmref.production.batch_api import batches
    from lmref.production.key_api import key_admin

    return {"batch": batches, "keys": key_admin}


@pytest.mark.parametrize("extra", [(), ("batch",), ("keys",), ("batch", "keys")])
def test_the_document_names_exactly_the_routes_served(extra, optional_blueprints):
    app = bare_app(*(optional_blueprints[e] for e in extra))
    web = app.test_client()
    doc = web.get("/openapi.json").json  # no key: public, like /health
    assert web.get("/v1/models").status_code == 401  # while the models stay behind the key
    check_structure(doc)
    served = {
        (openapi_path(r.rule)[0], m.lower())
        for r in app.url_map.iter_rules()
        if r.endpoint != "static"
        for m in r.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(p, m) for p, item in doc["paths"].items() for m in item}
    assert documented == served
    assert (("/v1/files", "post") in documented) == ("batch" in extra)
    assert (("/v1/admin/keys", "get") in documented) == ("keys" in extra)
    if "batch" in extra:  # the scope each route needs, as the guard checks it
        assert doc["paths"]["/v1/batches/{batch_id}"]["get"]["security"] == [
            {"bearerAuth": ["batch"]}
        ]
    assert doc["paths"]["/v1/admin/config"]["get"]["security"] == [{"bearerAuth": ["admin"]}]
    assert doc["paths"]["/health"]["get"]["security"] == []


def test_the_committed_compatibility_table_is_current():
    committed = (ROOT / "docs" / "openai_compatibility.md").read_text()
    assert committed == compatibility_table(full_app()), (
        "stale: python -m lmref.lab.api_docs docs/openai_compatibility.md"
    )


@pytest.fixture(scope="module")
def tiny_app(tiny_model_dir):
    config = ServingConfig(
        models=[ModelSpec("m", str(tiny_model_dir))], api_keys=[], load_in_background=False
    )
    app = create_app(config)
    yield app
    app.extensions["lmref"].close()


@pytest.mark.parametrize("route,chat", [("/v1/chat/completions", True), ("/v1/completions", False)])
def test_documented_fields_are_what_the_server_accepts_and_refuses(tiny_app, route, chat):
    """One request per documented field, with the value a client sends: accepted ones answer
    200, refused ones a 400 naming the field; the document and the server agree."""
    body = openapi_document(tiny_app)["paths"][route]["post"]["requestBody"]
    props = body["content"]["application/json"]["schema"]["properties"]
    web = tiny_app.test_client()
    base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    statuses = {}
    for f in fields_of(chat):
        support = props[f.name]["x-lmref-support"]
        sent = {**base, "max_tokens": 1, **f.needs, f.name: f.sample}
        r = web.post(route, json=sent)
        statuses[f.name] = support
        if support == "refused":
            assert r.status_code == 400, (f.name, r.json)
            assert r.json["error"]["param"] == f.name
        else:
            assert support in ("supported", "ignored"), (f.name, support)
            assert r.status_code == 200, (f.name, r.get_data(as_text=True)[:300])
    assert statuses["max_tokens"] == "supported" and statuses["stream"] == "supported"
    assert "ignored" not in {statuses[n] for n in ("temperature", "stop", "seed")}
