"""Labeling API, in process (FastAPI's TestClient): auth, the labeling flow,
and bad input (unknown pair, replayed id, wrong token, oversized body,
malformed JSON, script tags in text)."""

from __future__ import annotations

import logging
import re
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from rlhf.labeling.config import ProjectConfig
from rlhf.labeling.server import STATIC_DIR, allowed_hosts_for, create_app, redact_tokens, running
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
    client = TestClient(create_app(store, project, max_body_bytes=4096, allowed_hosts=["testserver"]))
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
    # Markdown is built element by element: no HTML parser, no link or source attribute from text.
    assert not re.search(r"DOMParser|createContextualFragment|srcdoc|\.href\s*=", js)
    # One source attribute: an image pair's <img>, set only to a value that matched a strict
    # PNG data-URI pattern (no other scheme, no markup can get through it).
    assert re.findall(r"\.src\s*=", js) == [".src ="]
    draw = js[js.index("function renderImage("):]
    draw = draw[:draw.index("\n}\n")]
    assert draw.index("!PNG_DATA_URI.test(source)") < draw.index("return;") < draw.index("img.src = source;")
    assert "const PNG_DATA_URI = /^data:image\\/png;base64,[A-Za-z0-9+/]+={0,2}$/;" in js
    assert "img-src 'self' data:;" in csp
    assert not re.search(r"""setAttribute\(\s*["'](on|href|src)""", js)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from a CDN
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


def test_a_late_label_on_a_pair_others_filled_is_409_and_the_labeler_moves_on(env):
    client, tokens, store, _ = env
    project = store.project("api")
    alice, bob = (store.authenticate(tokens[name]) for name in ("alice", "bob"))
    # Overlap 1. alice was shown a pair two hours ago and walked away: her lease lapsed.
    lapsed = store.next_pair(alice, now=time.time() - 7200).id
    assert client.get("/api/next", headers=auth(tokens["bob"])).json()["pair"]["id"] == lapsed  # her slot: bob's
    assert client.post("/api/labels", headers=auth(tokens["bob"]), json=label(lapsed, "B")).status_code == 201
    r = client.post("/api/labels?next=true", headers=auth(tokens["alice"]), json=label(lapsed))
    assert r.status_code == 409 and r.json()["code"] == "pair_full"
    assert f"pair {lapsed}: your hold on it lapsed" in r.json()["detail"] and "next pair" in r.json()["detail"]
    assert [(x.labeler, x.choice) for x in store.all_labels(project.id)] == [("bob", "B")]  # exactly one label
    nxt = client.get("/api/next", headers=auth(tokens["alice"])).json()  # what the page does on that 409
    assert nxt["pair"]["id"] != lapsed and nxt["progress"]["remaining"] == 2
    # bob was shown the last pair an hour ago; it lapsed but nobody took it: his late label is stored.
    last = store.next_pair(bob, now=time.time() - 3600).id
    assert last not in (lapsed, nxt["pair"]["id"])
    assert client.post("/api/labels", headers=auth(tokens["bob"]), json=label(last)).status_code == 201
    assert len(store.all_labels(project.id)) == 2


def test_ids_out_of_range_and_unprintable_text_are_422_not_500(env):
    client, tokens, store, _ = env
    h = auth(tokens["alice"])
    pair = client.get("/api/next", headers=h).json()["pair"]
    cases = {
        "pair_id": [{"pair_id": 2**63}, {"pair_id": 2**31}, {"pair_id": 10**30}],
        "supersedes": [{"supersedes": 2**31}],
        "reason": [{"reason": "nul \x00 byte"}, {"reason": "escape \x1b[31m"}, {"reason": "c1 \x85"},
                   {"reason": "carriage\rreturn"}],
        "strength": [{"choice": "tie", "strength": "better"}, {"strength": "a lot"}],
        "both_bad": [{"choice": "skip", "both_bad": True}, {"both_bad": "yes"}],
    }
    for field, bodies in cases.items():
        for extra in bodies:
            r = client.post("/api/labels", headers=h, json={**label(pair["id"]), **extra})
            assert r.status_code == 422, (field, extra, r.text)
            assert r.json()["error"].startswith(f"body.{field}"), r.json()
    r = client.post("/api/labels", headers=h, json={**label(pair["id"]), "reason": "nul \x00 byte"})
    assert "U+0000 at position 4" in r.json()["error"]
    # A lone surrogate, as JSON escapes can spell it.
    raw = ('{"client_id": "%s", "pair_id": %d, "choice": "A", "reason": "\\ud800"}' % (uuid.uuid4().hex, pair["id"]))
    r = client.post("/api/labels", headers={**h, "Content-Type": "application/json"}, content=raw.encode())
    assert r.status_code == 422 and r.json()["error"].startswith("body"), r.text
    for path in (f"/api/pairs/{2**63}", f"/api/pairs/{2**31}", "/api/pairs/0"):
        r = client.get(path, headers=h)
        assert r.status_code == 422 and r.json()["error"].startswith("path.pair_id"), (path, r.text)
    assert store.all_labels(store.project("api").id) == []  # nothing stored
    # Newlines and tabs are fine, and so is any printable text.
    ok = client.post("/api/labels", headers=h, json=label(pair["id"], reason="line 1\n\tline 2 ✓ 漢字"))
    assert ok.status_code == 201


def test_remaining_is_what_the_labeler_can_still_get(env):
    """'All done' never shows next to '1 remaining': a pair another labeler
    holds is not counted as remaining."""
    client, tokens, _, _ = env
    held = client.get("/api/next", headers=auth(tokens["alice"])).json()["pair"]["id"]  # alice holds one of 3
    bob = auth(tokens["bob"])
    r = client.get("/api/next", headers=bob).json()
    assert r["progress"]["remaining"] == 2  # the one bob sees and the one nobody holds
    while r["pair"] is not None:
        assert r["pair"]["id"] != held
        r = client.post("/api/labels?next=true", headers=bob, json=label(r["pair"]["id"])).json()["next"]
    assert r["progress"] == {"done": 2, "remaining": 0, "project_pairs": 3, "project_complete": 2}
    assert client.get("/api/me", headers=bob).json()["progress"]["remaining"] == 0


def test_strength_and_both_bad_are_stored_shown_and_part_of_the_replay_check(env):
    client, tokens, store, _ = env
    h = auth(tokens["alice"])
    first = client.get("/api/next", headers=h).json()["pair"]["id"]
    body = label(first, "B", strength="significantly_better", both_bad=True)
    assert client.post("/api/labels", headers=h, json=body).status_code == 201
    assert client.post("/api/labels", headers=h, json=body).status_code == 200  # a replay
    r = client.post("/api/labels", headers=h, json={**body, "strength": "better"})
    assert r.status_code == 409 and "already used" in r.json()["detail"]
    shown = client.get(f"/api/pairs/{first}", headers=h).json()["label"]
    assert (shown["choice"], shown["strength"], shown["both_bad"]) == ("B", "significantly_better", True)
    assert client.get("/api/history", headers=h).json()["labels"][0]["strength"] == "significantly_better"
    second = client.get("/api/next", headers=h).json()["pair"]["id"]
    assert client.post("/api/labels", headers=h, json=label(second, "tie", both_bad=True)).status_code == 201
    rows = store.current_labels(store.project("api").id)
    assert [(r.choice, r.strength, r.both_bad) for r in rows] == [("B", "significantly_better", True),
                                                                   ("tie", None, True)]
    st = client.get("/api/admin/stats", headers=auth(tokens["boss"])).json()["labels"]
    assert (st["both_bad"], st["with_strength"]) == (2, 1)


def test_api_answers_are_not_cached_and_the_page_is_revalidated(env):
    client, tokens, _, _ = env
    for r in (client.get("/api/me", headers=auth(tokens["alice"])), client.get("/api/next"),  # 401 too
              client.post("/api/labels", headers=auth(tokens["alice"]), json={})):
        assert r.headers["cache-control"] == "no-store", r.request.url
    assert client.get("/").headers["cache-control"] == "no-cache"


def test_host_header_is_checked_against_the_configured_names(env):
    _, tokens, store, _ = env
    project = store.project("api")
    h = auth(tokens["alice"])
    # The default: loopback names only, whatever the port.
    app = create_app(store, project)
    for base in ("http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000", "http://LOCALHOST."):
        assert TestClient(app, base_url=base).get("/api/me", headers=h).status_code == 200, base
    for base in ("http://testserver", "http://evil.example:8000", "http://127.0.0.1.evil.example"):
        r = TestClient(app, base_url=base).get("/api/me", headers=h)
        assert r.status_code == 400 and "is not served here" in r.json()["detail"], base
        assert "--allowed-host" in r.json()["detail"] and r.headers["x-frame-options"] == "DENY"
    # The server's own setting: the bind address decides, --allowed-host adds names.
    assert allowed_hosts_for("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts_for("::1", ["Labels.Example.COM"]) == ("localhost", "127.0.0.1", "::1", "labels.example.com")
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("127.0.0.1", ["*"]) is None
    assert "labels.example.com" in allowed_hosts_for("0.0.0.0", ["labels.example.com"])
    named = create_app(store, project, allowed_hosts=allowed_hosts_for("127.0.0.1", ["labels.example.com"]))
    assert TestClient(named, base_url="https://labels.example.com").get("/healthz").status_code == 200
    assert TestClient(create_app(store, project, allowed_hosts=None), base_url="http://any.example").get(
        "/healthz").status_code == 200


def test_tokens_in_logged_urls_are_redacted(env):
    _, tokens, store, _ = env
    assert redact_tokens("/?token=rlhf_abc&x=1") == "/?token=[redacted]&x=1"
    assert redact_tokens("/api/me?a=1&access_token=s3cret") == "/api/me?a=1&access_token=[redacted]"
    assert redact_tokens("/static/app.js") == "/static/app.js"
    # End to end: uvicorn's access log of a real server.
    httpx = pytest.importorskip("httpx")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    access = logging.getLogger("uvicorn.access")
    server = running(store, store.project("api"), access_log=True)
    handler = Collect()
    access.addHandler(handler)
    try:
        assert httpx.get(f"{server.url}/?token={tokens['alice']}&lang=en").status_code == 200
        refused = httpx.get(f"{server.url}/healthz", headers={"Host": "attacker.example"})
        assert refused.status_code == 400  # a loopback-bound server checks the Host header
    finally:
        access.removeHandler(handler)
        server.stop()
    assert any("token=[redacted]&lang=en" in line for line in lines), lines
    assert not any(tokens["alice"] in line for line in lines)


def test_ranking_item_submit_and_invalid_permutations_are_422_naming_the_field(tmp_path):
    from rlhf.labeling.store import new_ranking

    store = Store.open(str(tmp_path / "rank.db"), create=True)
    project = store.create_project("rank", ProjectConfig(overlap=1))
    store.add_pairs(project, [new_ranking(f"q{i}", [f"r{i}-{j}" for j in range(4)]) for i in range(2)])
    store.add_labeler(project, "alice", "tok-alice-" + "x" * 30)
    store.add_labeler(project, "bob", "tok-bob-" + "y" * 30)
    client = TestClient(create_app(store, project, allowed_hosts=["testserver"]))
    alice, bob = auth("tok-alice-" + "x" * 30), auth("tok-bob-" + "y" * 30)
    try:
        item = client.get("/api/next", headers=alice).json()["pair"]
        assert item["responses"] == [f"r0-{j}" for j in range(4)]
        for bad, field in [({"ranking": [0, 1, 2]}, "ranking"), ({"ranking": [0, 1, 2, 2]}, "ranking"),
                           ({"ranking": [1, 2, 3, 4]}, "ranking"), ({}, "ranking"),
                           ({"ranking": [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]}, "ranking"),
                           ({"ranking": [0, 1, 2, -1]}, "ranking"), ({"ranking": ["0", 1, 2, 3]}, "ranking")]:
            r = client.post("/api/labels", headers=alice, json=label(item["id"], "rank", **bad))
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["error"].startswith(f"body.{field}"), (bad, r.json())
        r = client.post("/api/labels", headers=alice, json=label(item["id"], "A"))
        assert r.status_code == 422 and r.json()["error"].startswith("body.choice")
        r = client.post("/api/labels", headers=alice, json=label(item["id"], "skip", ranking=[0, 1, 2, 3]))
        assert r.status_code == 422 and r.json()["error"].startswith("body.ranking")
        body = label(item["id"], "rank", ranking=[3, 1, 0, 2], both_bad=True)
        r = client.post("/api/labels?next=true", headers=alice, json=body)
        assert r.status_code == 201 and r.json()["next"]["pair"]["id"] != item["id"]
        assert client.post("/api/labels", headers=alice, json=body).status_code == 200  # replay
        got = client.get(f"/api/pairs/{item['id']}", headers=alice).json()
        assert got["label"]["ranking"] == [3, 1, 0, 2] and got["label"]["choice"] == "rank"
        # Overlap 1: bob gets only the item alice has not taken.
        nxt = client.get("/api/next", headers=bob).json()["pair"]
        assert nxt is None  # alice holds the other item's lease (handed out with ?next=true)
        stats = client.get("/api/me", headers=alice).json()["progress"]
        assert stats["done"] == 1
    finally:
        store.close()


def test_text_pairs_carry_no_kind_and_image_pairs_say_so(env):
    """Text pairs' answers are unchanged; a pair whose meta says kind "image" is marked for the page."""
    client, tokens, store, _ = env
    h = auth(tokens["alice"])
    assert set(client.get("/api/next", headers=h).json()["pair"]) == {"id", "prompt", "response_a", "response_b"}
    project = store.project("api")
    png = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJ"
           "RU5ErkJggg==")
    store.add_pairs(project, [NewPair("Which image?", png, png.replace("A", "B", 1), meta={"kind": "image"}),
                              NewPair("odd meta", "x", "y", meta={"kind": "<script>"})])
    seen = {}
    for _ in range(5):
        pair = client.get("/api/next", headers=h).json()["pair"]
        if pair is None:
            break
        seen[pair["prompt"]] = pair.get("kind")
        assert client.post("/api/labels", headers=h, json=label(pair["id"], "skip")).status_code == 201
    assert seen["Which image?"] == "image" and seen["odd meta"] is None  # only "image" is a kind
