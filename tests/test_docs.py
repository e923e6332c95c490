"""The docs hold together: every relative link in README.md and docs/*.md points at a
file (and heading) that exists, and no text file points outside the project."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(md: Path) -> set[str]:
    """GitHub's heading slugs: lowercase, punctuation dropped, spaces -> '-'."""
    out = set()
    for line in md.read_text().splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def _local_links(md: Path):
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # not links inside code blocks
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):
            yield target


def test_docs_exist():
    assert (REPO / "docs" / "ppo.md").is_file() and len(DOCS) > 2


def test_every_local_link_resolves():
    broken = []
    for md in DOCS:
        for target in _local_links(md):
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_no_file_points_outside_the_project():
    """Design notes outside the repository are not part of it: nothing may cite them."""
    banned = ["../" + "shared", "shared/" + "PPO", "PPO" + ".md", "DESIGN" + ".md", "STYLE" + ".md",
              "README_" + "SECTION"]
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        path = REPO / name
        if not path.is_file() or path.suffix in {".png", ".gz", ".parquet", ".db", ".safetensors"}:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{name}: {word}" for word in banned if word in text]
    assert not hits, "\n".join(hits)
