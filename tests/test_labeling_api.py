"""Labeling API, in process (FastAPI's TestClient): auth, the labeling flow,
and bad input (unknown pair, replayed id, wrong token, oversized body,
malformed JSON, script tags in text)."""

from __future__ import annotations

import re
import uuid

import pytest
from fastapi.testclient import TestClient

from rlhf.labeling.config import ProjectConfig
from rlhf.labeling.server import STATIC_DIR, create_app
from rlhf.labeling.store import NewPair, Store, hash_token

XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
SQLI = "'); DROP TABLE labeling_labels; --"


@pytest.fixture
def env(tmp_path):
    db = tmp_path / "labels.db"
    store = Store.open(str(db), create=True)
    project = store.create_project("api", ProjectConfig(overlap=1, guidelines=f"Be fair. {XSS}"))
    store.add_pairs(project, [NewPair(f"{XSS} prompt {i}\n  indented", f"{SQLI} A{i}", f"B{i}\n\nend")
                              for i in range(3)])
    other = store.create_project("other", ProjectConfig())
    tokens = {"alice": "tok-alice-" + "x" * 30, "bob": "tok-bob-" + "y" * 30, "boss": "tok-boss-" + "z" * 30,
              "stranger": "tok-other-" + "w" * 30}
    store.add_labeler(project, "alice", tokens["alice"])
    store.add_labeler(project, "bob", tokens["bob"])
    store.add_labeler(project, "boss", tokens["boss"], role="admin")
    store.add_labeler(other, "stranger", tokens["stranger"])
    client = TestClient(create_app(store, project, max_body_bytes=4096))
    yield client, tokens, store, db
    store.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def label(pair_id: int, choice: str = "A", **kw) -> dict:
    return {"client_id": uuid.uuid4().hex, "pair_id": pair_id, "choice": choice, **kw}


def test_every_api_call_needs_a_valid_token_and_the_right_role(env):
    client, tokens, _, _ = env
    for method, path in [("GET", "/api/me"), ("GET", "/api/next"), ("POST", "/api/labels"),
                         ("GET", "/api/history"), ("GET", "/api/pairs/1"), ("GET", "/api/admin/stats")]:
        for headers in ({}, auth("wrong-token"), auth(tokens["stranger"]), {"Authorization": "Basic abc"}):
            r = client.request(method, path, headers=headers, json=label(1))
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/admin/stats", headers=auth(tokens["alice"])).status_code == 403
    assert client.get("/api/next", headers=auth(tokens["boss"])).status_code == 403
    assert client.get("/api/admin/stats", headers=auth(tokens["boss"])).status_code == 200
    # The page itself and the health check are public; they carry no data.
    assert client.get("/").status_code == 200 and client.get("/healthz").status_code == 200


def test_tokens_are_stored_hashed(env):
    _, tokens, store, db = env
    store.close()  # flush the WAL into the main file
    raw = db.read_bytes()
    for token in tokens.values():
        assert token.encode() not in raw
        assert hash_token(token).encode() in raw


def test_labeling_flow_progress_revision_and_done(env):
    client, tokens, _, _ = env
    h = auth(tokens["alice"])
    me = client.get("/api/me", headers=h).json()
    assert me["guidelines"].endswith(XSS) and me["progress"] == {"done": 0, "remaining": 3, "project_pairs": 3,
                                                                 "project_complete": 0}
    first = client.get("/api/next", headers=h).json()["pair"]
    assert client.get("/api/next", headers=h).json()["pair"]["id"] == first["id"]  # reload: same pair
    # Text comes back verbatim as JSON data (escaping is the page's job, via textContent).
    assert first["prompt"] == f"{XSS} prompt 0\n  indented" and first["response_a"] == f"{SQLI} A0"
    r = client.post("/api/labels?next=true", headers=h, json=label(first["id"], reason=XSS))
    assert r.status_code == 201 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["next"]["pair"]["id"] != first["id"] and body["next"]["progress"]["done"] == 1
    hist = client.get("/api/history", headers=h).json()["labels"]
    assert hist[0]["reason"] == XSS and hist[0]["label_id"] == body["label_id"]
    # Revise: a new revision supersedes the old one, which stays in the history.
    back = client.get(f"/api/pairs/{first['id']}", headers=h).json()
    assert back["label"]["choice"] == "A"
    r = client.post("/api/labels", headers=h, json=label(first["id"], "B", supersedes=back["label"]["label_id"]))
    assert r.status_code == 201 and r.json()["revision"] == 1
    pair = client.get("/api/next", headers=h).json()["pair"]
    assert client.post("/api/labels", headers=h, json=label(pair["id"], "tie")).status_code == 201
    pair = client.get("/api/next", headers=h).json()["pair"]
    last = client.post("/api/labels?next=true", headers=h, json=label(pair["id"], "skip")).json()
    assert last["next"]["pair"] is None
    done = client.get("/api/next", headers=h).json()
    assert done["pair"] is None and done["progress"]["done"] == 3
    # Overlap 1: bob gets only the pair alice skipped (a skip does not fill a slot).
    assert client.get("/api/next", headers=auth(tokens["bob"])).json()["pair"]["id"] == pair["id"]
    st = client.get("/api/admin/stats", headers=auth(tokens["boss"])).json()
    assert st["labels"]["stored"] == 4 and st["labels"]["superseded"] == 1 and st["pairs"]["complete"] == 2


def test_bad_input_is_rejected_without_side_effects(env):
    client, tokens, store, _ = env
    h = auth(tokens["alice"])
    pair = client.get("/api/next", headers=h).json()["pair"]
    # Unknown pair; a pair not assigned to this labeler.
    assert client.post("/api/labels", headers=h, json=label(99_999)).status_code == 404
    r = client.post("/api/labels", headers=h, json=label(pair["id"] + 1))
    assert r.status_code == 409 and "not assigned" in r.json()["detail"]
    # Replayed client id: same body -> 200 and the same label; different body -> 409.
    body = label(pair["id"])
    first = client.post("/api/labels", headers=h, json=body)
    again = client.post("/api/labels", headers=h, json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == {**first.json(), "replayed": True}
    r = client.post("/api/labels", headers=h, json={**body, "choice": "B"})
    assert r.status_code == 409 and "already used" in r.json()["detail"]
    # Schema: the 422 names the field.
    cases = {
        "choice": {**label(pair["id"]), "choice": "C"},
        "pair_id": {**label(pair["id"]), "pair_id": "1"},  # strict: no string-to-int coercion
        "client_id": {**label(pair["id"]), "client_id": "../../etc"},
        "reason": {**label(pair["id"]), "reason": "x" * 2001},
        "extra": {**label(pair["id"]), "extra": 1},
    }
    for field, payload in cases.items():
        r = client.post("/api/labels", headers=h, json=payload)
        assert r.status_code == 422, field
        assert r.json()["error"].startswith(f"body.{field}"), r.json()
    missing = label(pair["id"])
    del missing["choice"]
    assert client.post("/api/labels", headers=h, json=missing).json()["error"].startswith("body.choice")
    # Malformed JSON.
    r = client.post("/api/labels", headers={**h, "Content-Type": "application/json"}, content=b'{"pair_id": 1,')
    assert r.status_code == 422 and r.json()["error"].startswith("body")
    # Oversized bodies: declared, and streamed without a Content-Length.
    big = {**label(pair["id"]), "reason": "x" * 5000}
    assert client.post("/api/labels", headers=h, json=big).status_code == 413

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    assert client.post("/api/labels", headers={**h, "Content-Type": "application/json"},
                       content=chunks()).status_code == 413
    assert client.get("/api/history", headers=h, params={"limit": 10**6}).status_code == 422
    # None of that stored anything beyond the one good label; the tables are intact.
    rows = store.all_labels(store.project("api").id)
    assert [r.id for r in rows] == [first.json()["label_id"]]


def test_page_has_no_inline_script_and_sends_security_headers(env):
    client, _, _, _ = env
    r = client.get("/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    assert "<script>" not in html and "onclick" not in html
    js = (STATIC_DIR / "app.js").read_text()
    # Text reaches the page only through textContent / createTextNode.
    assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML\(|document\.write|eval\(", js)
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../store.py").status_code == 404


def test_revoked_token_is_refused_at_once_and_its_open_pair_goes_to_others(env):
    client, tokens, store, _ = env
    project = store.project("api")
    first = client.get("/api/next", headers=auth(tokens["alice"])).json()["pair"]["id"]
    assert client.post("/api/labels", headers=auth(tokens["alice"]), json=label(first)).status_code == 201
    held = client.get("/api/next", headers=auth(tokens["alice"])).json()["pair"]["id"]  # leased to alice

    assert store.revoke_labeler(project, "alice") == (True, 1)  # the leased pair is released
    assert store.revoke_labeler(project, "alice") == (False, 0)  # idempotent
    for method, path in [("GET", "/api/me"), ("GET", "/api/next"), ("POST", "/api/labels")]:
        assert client.request(method, path, headers=auth(tokens["alice"]), json=label(held)).status_code == 401
    # overlap 1: alice's labeled pair stays done; the one she held is open to bob again.
    given = set()
    while (r := client.get("/api/next", headers=auth(tokens["bob"])).json())["pair"] is not None:
        given.add(r["pair"]["id"])
        assert client.post("/api/labels", headers=auth(tokens["bob"]), json=label(r["pair"]["id"])).status_code == 201
    assert held in given and first not in given
    assert {r.labeler for r in store.current_labels(project.id)} == {"alice", "bob"}  # her label is kept
    # A new token reinstates her.
    store.add_labeler(project, "alice", "tok-alice-new-" + "q" * 30, replace_token=True)
    assert client.get("/api/me", headers=auth("tok-alice-new-" + "q" * 30)).status_code == 200
