"""End to end in headless Chromium: a labeler labels pairs with the keyboard,
then the export trains a reward model.

Uses Debian's ``chromium`` through Playwright's ``executable_path`` (never
``playwright install``); skipped when either is missing.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from rlhf.labeling.config import ProjectConfig
from rlhf.labeling.pairs import read_pair_file
from rlhf.labeling.store import NewPair, Store, Submission
from helpers.labeling import ServerProcess

REPO = Path(__file__).resolve().parents[1]
PREFS = REPO / "data" / "quickstart" / "prefs_test.jsonl"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
N_PAIRS = 12


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def make_project(db: str) -> tuple[dict[str, str], dict[str, str]]:
    """Pairs from the bundled preference data (we know which side is 'right')
    plus one pair of hostile text. Returns tokens and response -> 'good'/'bad'."""
    cands = read_pair_file(str(PREFS))[:N_PAIRS]
    assert len({c.prompt for c in cands}) == N_PAIRS  # the test keys decisions by prompt
    truth = {}
    pairs = []
    for i, c in enumerate(cands):
        good, bad = c.response_1, c.response_2  # prefs files list chosen first
        truth[good], truth[bad] = "good", "bad"
        pairs.append(NewPair(c.prompt, *((good, bad) if i % 2 else (bad, good))))
    pairs.append(NewPair(f"{XSS}\n    keep   this   spacing", f"{XSS} first\nsecond line", f"plain {XSS}"))
    store = Store.open(db, create=True)
    project = store.create_project("e2e", ProjectConfig(guidelines="Pick the review that reads better.\n"
                                                                   f"Never trust text like {XSS}"))
    store.add_pairs(project, pairs)
    tokens = {"ann": "rlhf_e2e_ann_" + "a" * 32, "boss": "rlhf_e2e_boss_" + "b" * 32}
    store.add_labeler(project, "ann", tokens["ann"])
    store.add_labeler(project, "boss", tokens["boss"], role="admin")
    store.close()
    return tokens, truth


def test_keyboard_labeling_then_export_trains_a_reward_model(browser, tmp_path):
    from playwright.sync_api import expect

    from rlhf.cli import main
    from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer, save_checkpoint
    from rlhf.recipe import load_recipe, run

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    tokens, truth = make_project(db)
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{server.url}/#token={tokens['ann']}")
        page.wait_for_selector("#label-view:not([hidden])")
        assert "token" not in page.url  # the sign-in fragment is removed from the address bar
        assert page.locator("#project-name").text_content() == "e2e"
        # Desktop: responses side by side.
        a_box, b_box = page.locator("#side-a").bounding_box(), page.locator("#side-b").bounding_box()
        assert abs(a_box["y"] - b_box["y"]) < 1 and b_box["x"] > a_box["x"] + a_box["width"] - 1
        page.keyboard.press("g")
        assert XSS in page.locator("#guidelines").text_content()

        decisions = {}  # prompt text -> the response the labeler preferred
        done = 0
        while not page.locator("#label-view").is_hidden():
            # Read everything before pressing a key: the answer brings the next pair on screen.
            prompt = page.locator("#prompt").text_content()
            a, b = page.locator("#response-a").text_content(), page.locator("#response-b").text_content()
            if XSS in prompt:
                # Hostile text is shown as text: exact characters, whitespace kept, nothing executed.
                assert prompt == f"{XSS}\n    keep   this   spacing"
                assert a == f"{XSS} first\nsecond line"
                assert page.evaluate("window.__pwned") is None
                assert page.locator("#response-a img, #prompt script").count() == 0
                assert page.eval_on_selector("#prompt", "el => getComputedStyle(el).whiteSpace") == "pre-wrap"
                page.keyboard.press("s")  # skip: no opinion on this one
            elif done == 3:
                page.keyboard.press("3")  # a tie: dropped from the export
            else:
                if done == 1:  # a reason, typed after R; Escape gives the keys back to the page
                    page.keyboard.press("r")
                    page.keyboard.type("the <b>first</b> one is on topic")
                    page.keyboard.press("Escape")
                # Deliberately wrong on pair 2, revised with U below.
                wants_a = (truth[a] == "good") != (done == 2)
                page.keyboard.press("1" if wants_a else "2")
                decisions[prompt] = a if wants_a else b
            done += 1
            expect(page.locator("#progress-text")).to_have_text(re.compile(rf"^{done} done"))
            if done == 3:
                # U: back to the last label, change the answer; the old one stays in the history.
                page.keyboard.press("u")
                page.wait_for_selector("#revising:not([hidden])")
                revised_prompt = page.locator("#prompt").text_content()
                a, b = page.locator("#response-a").text_content(), page.locator("#response-b").text_content()
                page.keyboard.press("1" if truth[a] == "good" else "2")
                decisions[revised_prompt] = a if truth[a] == "good" else b
                page.wait_for_selector("#revising", state="hidden")
        assert done == N_PAIRS + 1
        assert page.locator("#done-view").is_visible()
        assert page.evaluate("window.__pwned") is None

        # Phone: the same page stacks the responses.
        phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        phone.goto(f"{server.url}/#token={tokens['ann']}")
        phone.wait_for_selector("#done-view:not([hidden])")
        phone.locator("#revise-last").click()
        phone.wait_for_selector("#revising:not([hidden])")
        a_box, b_box = phone.locator("#side-a").bounding_box(), phone.locator("#side-b").bounding_box()
        assert b_box["y"] >= a_box["y"] + a_box["height"] and a_box["width"] <= 390
        phone.close()

        # Admin view: progress per labeler.
        admin = browser.new_page()
        admin.goto(f"{server.url}/admin#token={tokens['boss']}")
        admin.wait_for_selector("#admin-view:not([hidden])")
        expect(admin.locator("#admin-rows")).to_contain_text("ann")
        assert "12 of 13 pairs complete" in admin.locator("#admin-summary").text_content()  # the skip is open
        admin.close()
        page.close()

    # Export what the labeler chose, and train a reward model on it.
    out = tmp_path / "labeled.jsonl"
    assert main(["-q", "label", "export", "--db", db, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == N_PAIRS - 1  # the tie is dropped; the hostile pair was skipped
    for row in rows:
        assert row["chosen"] == decisions[row["prompt"]] and truth[row["chosen"]] == "good"
    store = Store.open(db)
    history = store.all_labels(store.project("e2e").id)
    assert len(history) == N_PAIRS + 2 and sum(r.revision for r in history) == 1  # 13 labels + 1 revision
    assert any(r.reason == "the <b>first</b> one is on topic" for r in history)
    store.close()

    tok = load_tokenizer(ModelConfig("tiny"))
    sft = save_checkpoint(load_causal_lm(ModelConfig("tiny"), tok, seed=0), tok, tmp_path / "sft_final")
    recipe_path = tmp_path / "reward.yaml"
    recipe_path.write_text(f"""\
output_dir: {tmp_path / 'run'}
seed: 0
stages:
  reward:
    type: reward
    model: {sft}
    data:
      path: {out}                        # the export
      eval_path: "{db}?project=e2e"      # the database itself, read directly
    max_length: 128
    train: {{max_steps: 3, batch_size: 4, learning_rate: 1.0e-3, logging_steps: 1, save_steps: 100}}
""")
    results = run(load_recipe(recipe_path))
    final = results["reward"]
    assert (final / "model.safetensors").exists()
    summary = json.loads((tmp_path / "run" / "reward" / "metrics.json").read_text())
    assert summary["train/steps"] == 3 and summary["train/pairs"] == N_PAIRS - 1
    assert summary["eval/pairs"] == N_PAIRS - 1


def test_a_sign_in_link_opened_in_a_tab_already_on_the_page_signs_in(browser, tmp_path):
    """The link only changes the fragment (no reload): the page must notice."""
    from playwright.sync_api import expect

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    tokens, _ = make_project(db)
    with Store.open(db) as store:
        store.add_labeler(store.project("e2e"), "bea", "rlhf_e2e_bea_" + "c" * 32)
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page()
        page.goto(f"{server.url}/#token={tokens['ann']}")
        page.wait_for_selector("#label-view:not([hidden])")
        expect(page.locator("#who")).to_contain_text("ann")
        page.goto(f"{server.url}/#token={'rlhf_e2e_bea_' + 'c' * 32}")  # same document: only the fragment changes
        expect(page.locator("#who")).to_contain_text("bea")
        assert "token" not in page.url
        page.close()


def test_strength_and_both_bad_with_the_keyboard_only(browser, tmp_path):
    """Q W E N pick how much better (the same key again clears it), X marks
    both bad; the answer key sends them, and only where they apply."""
    from playwright.sync_api import expect

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    tokens, _ = make_project(db)
    pressed = lambda sel: page.locator(sel).get_attribute("aria-pressed")  # noqa: E731
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page()
        page.goto(f"{server.url}/#token={tokens['ann']}")
        page.wait_for_selector("#label-view:not([hidden])")
        steps = [(["q"], "1", "Saved: A is significantly better."),
                 (["x"], "3", "Saved: tie, both bad."),
                 (["w", "w", "e"], "2", "Saved: B is slightly better."),
                 (["e", "x"], "s", "Saved: skip."),  # a skip takes neither
                 (["n", "x"], "1", "Saved: A is negligibly better or unsure, both bad.")]
        for done, (keys, answer, saved) in enumerate(steps, start=1):
            for key in keys:
                page.keyboard.press(key)
            if keys == ["q"]:
                assert pressed("#strength-significantly") == "true" and pressed("#strength-better") == "false"
            if keys == ["w", "w", "e"]:
                assert pressed("#strength-better") == "false" and pressed("#strength-slightly") == "true"
            page.keyboard.press(answer)
            expect(page.locator("#progress-text")).to_have_text(re.compile(rf"^{done} done"))
            expect(page.locator("#status")).to_have_text(saved)
            # The next pair starts clean.
            assert pressed("#both-bad") == "false"
            assert page.locator(".strengths button[aria-pressed='true']").count() == 0
        # U brings the last label back with its strength and mark, ready to change.
        page.keyboard.press("u")
        page.wait_for_selector("#revising:not([hidden])")
        assert pressed("#strength-negligibly") == "true" and pressed("#both-bad") == "true"
        page.keyboard.press("x")  # not both bad after all
        page.keyboard.press("1")
        page.wait_for_selector("#revising", state="hidden")
        page.close()
    with Store.open(db) as store:
        history = store.all_labels(store.project("e2e").id)
    assert [(r.choice, r.strength, r.both_bad) for r in history] == [
        ("A", "significantly_better", False), ("tie", None, True), ("B", "slightly_better", False),
        ("skip", None, False), ("A", "negligibly_better", True), ("A", "negligibly_better", False)]


def test_the_page_moves_on_after_a_refused_late_label_and_never_retries_a_4xx(browser, tmp_path):
    from playwright.sync_api import expect

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    tokens, _ = make_project(db)  # overlap 1
    with Store.open(db) as store:
        bea = store.add_labeler(store.project("e2e"), "bea", "rlhf_e2e_bea_" + "c" * 32)
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page()
        posts: list[str] = []
        page.on("request", lambda req: posts.append(req.url) if req.method == "POST" else None)
        page.goto(f"{server.url}/#token={tokens['ann']}")
        page.wait_for_selector("#label-view:not([hidden])")
        shown = page.locator("#prompt").text_content()
        # ann's lease lapses (as after a long break) and bea labels the pair meanwhile.
        with Store.open(db) as store:
            with store.transaction() as s:
                s.execute(text("UPDATE labeling_assignments SET expires_at = 0 WHERE status = 'open'"))
            taken = store.next_pair(bea)
            store.submit(bea, Submission("bea-late-test-1", taken.id, "B"))
        page.keyboard.press("1")
        expect(page.locator("#status")).to_contain_text(re.compile(r"your hold on pair \d+ lapsed.*next pair"))
        expect(page.locator("#prompt")).not_to_have_text(shown)  # on to the next pair, no retry
        assert len(posts) == 1
        # A 422 (a control character in the reason) is final too: shown, not retried.
        page.fill("#reason", "bad \u0001 char")
        page.keyboard.press("Escape")
        page.keyboard.press("1")
        expect(page.locator("#status")).to_contain_text("Not saved: body.reason")
        page.wait_for_timeout(1500)  # a retry would have gone out after 300 ms
        assert len(posts) == 2
        expect(page.locator("#status")).to_contain_text("Not saved: body.reason")
        page.fill("#reason", "fine")
        page.keyboard.press("Escape")
        page.keyboard.press("1")
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^1 done"))
        page.close()
    with Store.open(db) as store:
        votes = Counter(r.pair_id for r in store.current_labels(store.project("e2e").id) if r.choice != "skip")
    assert set(votes.values()) == {1}  # no pair labeled twice


# ---------------------------------------------------------------- Markdown, XSS, long responses

def seed(db: str, pairs: list[NewPair]) -> str:
    """A project holding exactly these pairs (shown in this order) and one labeler; returns the token."""
    store = Store.open(db, create=True)
    project = store.create_project("md", ProjectConfig(guidelines="Compare."))
    assert store.add_pairs(project, pairs)[0] == len(pairs)
    token = "rlhf_md_ann_" + "d" * 32
    store.add_labeler(project, "ann", token)
    store.close()
    return token


# What may appear inside a text pane: the Markdown renderer's elements, and only
# these attributes (class and the code block's data-lang, start on a numbered list).
PANE_TAGS = {"P", "PRE", "CODE", "STRONG", "EM", "UL", "OL", "LI", "H4", "H5", "H6", "SPAN", "DIV"}
PANE_ATTRS = {"class", "data-lang", "start"}
PANES = "#prompt, #response-a, #response-b"
PANE_CONTENT = ("els => els.flatMap(el => [...el.querySelectorAll('*')])"
                ".map(e => [e.tagName, ...[...e.attributes].map(a => a.name)])")

MD_A = """\
# Sorting in Python

Use **`sorted`** for a *new* list
or `list.sort()` in place.

```python
def top(xs, n=3):
    return sorted(xs, reverse=True)[:n]  # <b>not bold</b>
```

- one
- two with **bold**
  - nested item
- three
"""
MD_B = """\
## Steps

3. first
4. second

See [the docs](https://docs.python.org/3/howto/sorting.html).
"""


def test_markdown_in_prompt_and_responses_is_rendered_as_elements(browser, tmp_path):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    token = seed(db, [NewPair("Explain `sorted` vs **sort**:\n\n1. briefly\n2. with code", MD_A, MD_B)])
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{server.url}/#token={token}")
        page.wait_for_selector("#label-view:not([hidden])")
        a, b, prompt = page.locator("#response-a"), page.locator("#response-b"), page.locator("#prompt")
        # Prompt: inline code, bold, a numbered list.
        assert prompt.locator("p code").text_content() == "sorted"
        assert prompt.locator("p strong").text_content() == "sort"
        assert prompt.locator("ol > li").all_text_contents() == ["briefly", "with code"]
        # A fenced block becomes <pre><code>, its text verbatim (HTML inside stays text).
        assert a.locator("pre > code").text_content() == (
            "def top(xs, n=3):\n    return sorted(xs, reverse=True)[:n]  # <b>not bold</b>")
        assert a.locator("pre").get_attribute("data-lang") == "python"
        assert a.locator("pre b").count() == 0
        assert a.locator("h4").text_content() == "Sorting in Python"
        assert a.locator("p strong > code").text_content() == "sorted"
        assert a.locator("p em").text_content() == "new"
        assert a.locator("p").first.text_content() == "Use sorted for a new list\nor list.sort() in place."
        assert a.locator(":scope > ul > li").count() == 3
        assert a.locator(":scope > ul > li").nth(1).locator("strong").text_content() == "bold"
        assert a.locator("ul ul > li").all_text_contents() == ["nested item"]
        # B: a heading, a list numbered from 3, a link shown as text with its URL, not an <a>.
        assert b.locator("h5").text_content() == "Steps"
        assert b.locator("ol").get_attribute("start") == "3"
        assert b.locator("ol > li").all_text_contents() == ["first", "second"]
        assert b.locator("a").count() == 0
        assert "the docs (https://docs.python.org/3/howto/sorting.html)" in b.locator("p").text_content()
        for tag, *attrs in page.eval_on_selector_all(PANES, PANE_CONTENT):
            assert tag in PANE_TAGS and set(attrs) <= PANE_ATTRS, (tag, attrs)
        page.keyboard.press("1")  # the keys still answer
        page.wait_for_selector("#done-view:not([hidden])")
        page.close()


# Classic payloads, each with the characters that must show as text.
XSS_CORPUS = [
    ("<script>alert(1)</script>", "<script>alert(1)</script>"),
    ("<img src=x onerror=alert(1)>", "<img src=x onerror=alert(1)>"),
    ("<svg onload=alert(1)><circle r=9></svg>", "<svg onload=alert(1)>"),
    ("[click me](javascript:alert(1))", "javascript:alert(1)"),
    ("![pic](javascript:alert(1)) and ![x](x onerror=alert(1))", "javascript:alert(1)"),
    ('<iframe src="javascript:alert(1)"></iframe>', '<iframe src="javascript:alert(1)">'),
    ('<a href="javascript:alert(1)">link</a>', '<a href="javascript:alert(1)">link</a>'),
    ('<div onmouseover="alert(1)" style="position:fixed;inset:0">hover</div>', 'onmouseover="alert(1)"'),
    ("&lt;script&gt;alert(1)&lt;/script&gt; &#60;img src=x onerror=alert(1)&#62;", "&lt;script&gt;"),
    ("<img src=x onerror=alert(1)//", "<img src=x onerror=alert(1)//"),
    ("`<script>alert(1)</script>` and **<img src=x onerror=alert(1)>**", "<img src=x onerror=alert(1)>"),
    ("```html\n<script>alert(1)</script>\n<svg/onload=alert(1)>\n```", "<svg/onload=alert(1)>"),
    ('"><script>alert(1)</script><p title="', '"><script>alert(1)</script>'),
    ("<details open ontoggle=alert(1)>x</details>", "ontoggle=alert(1)"),
    ("<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>", "<mglyph><style>"),
    ("<scr<script>ipt>alert(1)</scr</script>ipt>", "<scr<script>ipt>"),
    ("[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)", "data:text/html;base64,"),
    ('<object data="javascript:alert(1)"></object><embed src="javascript:alert(1)">', "<embed src="),
    ("- <style>*{display:none}</style>\n- *<b onclick=alert(1)>x</b>*", "<style>*{display:none}</style>"),
    ("# <img src=x onerror=alert(1)>\n[a](<javascript:alert(1)>) \\u003cscript\\u003e", "\\u003cscript\\u003e"),
]


def test_xss_corpus_in_prompt_and_responses_stays_text(browser, tmp_path):
    from playwright.sync_api import expect

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    pairs = [NewPair(f"Q{i}: {payload}", payload, f"**Answer {i}:**\n\n1. {payload}\n\n{payload}")
             for i, (payload, _) in enumerate(XSS_CORPUS)]
    token = seed(db, pairs)
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{server.url}/#token={token}")
        for i, (payload, visible) in enumerate(XSS_CORPUS):
            expect(page.locator("#prompt")).to_have_text(re.compile(rf"^Q{i}: "))
            page.wait_for_timeout(50)  # let anything that would fire (onerror, onload) fire
            for pane in ("#prompt", "#response-a", "#response-b"):
                assert visible in page.locator(pane).inner_text(), (payload, pane)
            assert page.locator(", ".join(f"{p} {tag}" for p in ("#prompt", "#response-a", "#response-b")
                                          for tag in ("script", "img", "svg", "iframe", "a", "object",
                                                      "embed", "style", "math", "details", "b"))).count() == 0
            for tag, *attrs in page.eval_on_selector_all(PANES, PANE_CONTENT):
                assert tag in PANE_TAGS and set(attrs) <= PANE_ATTRS, (payload, tag, attrs)
            assert page.locator("#response-a").is_visible()  # no payload hid the page
            page.keyboard.press("s")
        page.wait_for_selector("#done-view:not([hidden])")
        page.wait_for_timeout(200)
        assert dialogs == []
        page.close()


LONG = "\n\n".join([f"Paragraph {i}: " + "a long line of model output " * 6 for i in range(120)]
                   + ["```text\n" + "\n".join(f"code line {i}" for i in range(150)) + "\n```", "THE END"])


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 800}, {"width": 390, "height": 844}],
                         ids=["desktop", "phone"])
def test_long_responses_scroll_in_their_panes_and_the_action_bar_stays_in_view(browser, tmp_path, viewport):
    from playwright.sync_api import expect

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    token = seed(db, [NewPair(f"Long one {i}\n\n" + LONG[:3000], "A says:\n\n" + LONG, "B says:\n\n" + LONG)
                      for i in range(2)])
    phone = viewport["width"] < 700
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page(viewport=viewport, is_mobile=phone, has_touch=phone)
        page.goto(f"{server.url}/#token={token}")
        page.wait_for_selector("#label-view:not([hidden])")
        height = viewport["height"]

        def bar_in_view() -> None:
            box = page.locator("#action-bar").bounding_box()
            assert box["y"] >= 0 and box["y"] + box["height"] <= height + 0.5, box
            assert box["height"] < height * 0.4, box  # leaves room for the text
            for sel in ("#choose-a", "#choose-b", "#choose-tie", "#both-bad", "#choose-skip"):
                expect(page.locator(sel)).to_be_in_viewport(ratio=1)

        a_box, b_box = page.locator("#side-a").bounding_box(), page.locator("#side-b").bounding_box()
        if phone:  # stacked
            assert b_box["y"] >= a_box["y"] + a_box["height"] and a_box["width"] <= 390
        else:  # side by side
            assert abs(a_box["y"] - b_box["y"]) < 1 and b_box["x"] > a_box["x"] + a_box["width"] - 1
        for pane in ("#prompt", "#response-a", "#response-b"):  # each scrolls by itself
            assert page.eval_on_selector(pane, "el => el.scrollHeight > el.clientHeight + 100"), pane
            assert page.eval_on_selector(pane, "el => getComputedStyle(el).overflowY") == "auto"
            assert page.eval_on_selector(pane, "el => el.getBoundingClientRect().height") < height * 0.55
        bar_in_view()
        page.mouse.wheel(0, 100000)  # the page itself scrolled to its end
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        bar_in_view()
        page.evaluate("window.scrollTo(0, 0)")
        bar_in_view()

        # Keyboard only: Tab into response B's pane, scroll it with the keys, then answer.
        for _ in range(12):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "response-b":
                break
        assert page.evaluate("document.activeElement.id") == "response-b"
        page.keyboard.press("End")
        # (page.wait_for_function would evaluate a string: the page's CSP refuses that.)
        at_end = "el => el.scrollTop > 0 && el.scrollTop + el.clientHeight >= el.scrollHeight - 2"
        for _ in range(50):
            if page.eval_on_selector("#response-b", at_end):
                break
            page.wait_for_timeout(100)
        assert page.eval_on_selector("#response-b", at_end)
        expect(page.locator("#response-b p").last).to_be_in_viewport()  # "THE END", scrolled to in the pane
        bar_in_view()
        page.keyboard.press("w")
        page.keyboard.press("2")
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^1 done"))
        expect(page.locator("#status")).to_have_text("Saved: B is better.")
        # The next pair starts at the top of each pane, the bar still in view.
        expect(page.locator("#prompt")).to_contain_text("Long one 1")
        assert page.eval_on_selector("#response-b", "el => el.scrollTop") == 0
        bar_in_view()
        page.keyboard.press("3")
        page.wait_for_selector("#done-view:not([hidden])")
        page.close()
    with Store.open(db) as store:
        assert [(r.choice, r.strength) for r in store.all_labels(store.project("md").id)] == [
            ("B", "better"), ("tie", None)]


# ---------------------------------------------------------------- ranking K responses, keyboard only


def test_ranking_item_ordered_and_submitted_with_the_keyboard_only(browser, tmp_path):
    from playwright.sync_api import expect

    from rlhf.labeling.store import new_ranking

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    shown = ["first **one**", "second", "third", f"fourth {XSS}"]
    token = seed(db, [new_ranking("Rank these", shown), new_ranking("Rank again", ["w", "x", "y", "z"])])
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{server.url}/#token={token}")
        page.wait_for_selector("#rank-view:not([hidden])")
        assert page.locator("#pair-responses").is_hidden() and page.locator("#action-bar").is_hidden()
        items = page.locator("#ranking > li")
        assert items.count() == 4
        assert items.nth(0).locator("strong").text_content() == "one"  # Markdown, as in A/B panes
        # Numbers in order, best to worst: 3 1 4 2.
        for key in "314":
            page.keyboard.press(key)
        expect(items.locator(".rank-name")).to_have_text(["Response 3", "Response 1", "Response 4", "Response 2"])
        page.keyboard.press("Backspace")  # start over
        expect(items.locator(".rank-name")).to_have_text(["Response 1", "Response 2", "Response 3", "Response 4"])
        for key in "3142":
            page.keyboard.press(key)
        # Then fix it by moving: focus response 2 (last) with Tab and move it up one place.
        page.locator("#rank-item-2").focus()
        page.keyboard.press("ArrowUp")
        expect(items.locator(".rank-name")).to_have_text(["Response 3", "Response 1", "Response 2", "Response 4"])
        assert page.evaluate("document.activeElement.id") == "rank-item-2"  # focus stays on the moved one
        page.keyboard.press("k")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowDown")
        expect(items.locator(".rank-name")).to_have_text(["Response 3", "Response 1", "Response 4", "Response 2"])
        page.keyboard.press("x")  # all bad
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_have_text("Saved: ranking 3 > 1 > 4 > 2, all bad.")
        expect(page.locator("#ranking > li .rank-name").first).to_have_text("Response 1")
        assert page.locator("#ranking > li").first.locator(".pane").text_content() == "w"
        assert page.evaluate("window.__pwned") is None
        page.close()
    with Store.open(db) as store:
        (label,) = store.current_labels(store.project("md").id)
        assert (label.choice, label.ranking, label.both_bad) == ("rank", (2, 0, 3, 1), True)


def test_ranking_reordered_by_drag_and_drop_then_submitted_with_the_mouse(browser, tmp_path):
    from playwright.sync_api import expect

    from rlhf.labeling.store import new_ranking

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    token = seed(db, [new_ranking("Rank these", ["a", "b", "c", "d"])])
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{server.url}/#token={token}")
        page.wait_for_selector("#rank-view:not([hidden])")
        names = page.locator("#ranking > li .rank-name")
        page.locator("#rank-item-4").drag_to(page.locator("#rank-item-1"))  # 4 takes 1's place
        expect(names).to_have_text(["Response 4", "Response 1", "Response 2", "Response 3"])
        page.locator("#rank-item-1").drag_to(page.locator("#rank-item-3"))
        expect(names).to_have_text(["Response 4", "Response 2", "Response 3", "Response 1"])
        page.locator("#submit-ranking").click()
        expect(page.locator("#status")).to_have_text("Saved: ranking 4 > 2 > 3 > 1.")
        page.close()
    with Store.open(db) as store:
        (label,) = store.current_labels(store.project("md").id)
        assert (label.choice, label.ranking) == ("rank", (3, 1, 2, 0))


def test_ranking_on_a_phone_with_the_move_buttons(browser, tmp_path):
    from playwright.sync_api import expect

    from rlhf.labeling.store import new_ranking

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    token = seed(db, [new_ranking("Rank these", ["a " * 200, "b", "c"])])
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        phone.goto(f"{server.url}/#token={token}")
        phone.wait_for_selector("#rank-view:not([hidden])")
        names = phone.locator("#ranking > li .rank-name")
        # The first cannot go up, the last cannot go down; the rest are finger-sized.
        assert phone.locator("#rank-up-1").is_disabled() and phone.locator("#rank-down-3").is_disabled()
        for i in range(1, 4):
            box = phone.locator(f"#rank-item-{i}").bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box  # no sideways scrolling
        button = phone.locator("#rank-down-1").bounding_box()
        assert button["width"] >= 40 and button["height"] >= 40, button
        phone.locator("#rank-down-1").tap()
        expect(names).to_have_text(["Response 2", "Response 1", "Response 3"])
        phone.locator("#rank-up-3").tap()
        phone.locator("#rank-up-3").tap()
        expect(names).to_have_text(["Response 3", "Response 2", "Response 1"])
        phone.locator("#submit-ranking").tap()
        expect(phone.locator("#status")).to_have_text("Saved: ranking 3 > 2 > 1.")
        phone.close()
    with Store.open(db) as store:
        (label,) = store.current_labels(store.project("md").id)
        assert (label.choice, label.ranking) == ("rank", (2, 1, 0))


def test_image_pairs_are_drawn_as_images_and_nothing_else_becomes_one(browser, tmp_path):
    """An image pair (meta kind "image", PNG data URIs) shows two <img>; a text pair holding a
    PNG data URI, and an image pair holding anything but one, show text."""
    import torch
    from playwright.sync_api import expect

    from rlhf.labeling.images import encode_image

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    a, b = encode_image(torch.rand(1, 8, 8)), encode_image(torch.rand(1, 8, 8))
    image = {"kind": "image"}
    token = seed(db, [
        NewPair("Q0: Which image is the better **digit**?", a, b, meta=image),
        NewPair("Q1: text pair", a, "plain text"),
        NewPair(f"Q2: {XSS}", "javascript:alert(1)", "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
                meta=image),
    ])
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        page = browser.new_page(viewport={"width": 390, "height": 844})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{server.url}/#token={token}")
        expect(page.locator("#prompt")).to_have_text(re.compile(r"^Q0: "))
        assert page.locator("#prompt strong").text_content() == "digit"  # the question is Markdown as ever
        assert [page.locator(f"#response-{s} img").get_attribute("src") for s in "ab"] == [a, b]
        page.wait_for_function("() => [...document.querySelectorAll('#pair-responses img')]"
                               ".every(i => i.complete && i.naturalWidth === 8 && i.naturalHeight === 8)")
        assert page.locator("#response-a img").bounding_box()["width"] >= 100  # scaled up to be seen
        page.keyboard.press("2")
        expect(page.locator("#prompt")).to_have_text(re.compile(r"^Q1: "))
        assert page.locator("#pair-responses img").count() == 0
        assert page.locator("#response-a").inner_text().startswith("data:image/png;base64,")
        page.keyboard.press("1")
        expect(page.locator("#prompt")).to_have_text(re.compile(r"^Q2: "))
        page.wait_for_timeout(50)
        assert page.locator("#pair-responses img, #pair-responses a, #pair-responses iframe").count() == 0
        assert page.locator("#response-a").inner_text() == "javascript:alert(1)"
        assert page.locator("#response-b").inner_text().startswith("data:text/html;base64,")
        page.keyboard.press("1")
        page.wait_for_selector("#done-view:not([hidden])")
        assert dialogs == [] and page.evaluate("window.__pwned") is None
        page.close()
