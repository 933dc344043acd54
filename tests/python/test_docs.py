"""The documentation stands alone: every relative link in the repository's markdown files
resolves to a file inside the repository (and, with `#anchor`, to a heading there), no file
points outside the repository, and the README starts with exactly its two commands."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")


def markdown_files():
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / p for p in tracked if (ROOT / p).exists()]


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield i, line


def slug(heading):
    """GitHub's anchor of a heading."""
    h = heading.strip().lower().replace("`", "")
    return "".join(c for c in h if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path):
    seen = set()
    for _, line in prose_lines(path.read_text()):
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            s, base, n = slug(m.group(2)), slug(m.group(2)), 1
            while s in seen:
                s, n = f"{base}-{n}", n + 1
            seen.add(s)
    return seen


def link_problems(path, root=ROOT):
    problems = []
    text = path.read_text()
    for i, line in prose_lines(text):
        for m in LINK.finditer(line):
            url = m.group(2)
            if re.match(r"^[a-z]+://", url) or url.startswith("mailto:"):
                continue
            target, _, frag = url.partition("#")
            dest = (path.parent / target).resolve() if target else path
            where = f"{path.relative_to(root)}:{i}: {url}"
            try:
                dest.relative_to(root)
            except ValueError:
                problems.append(f"{where} leaves the repository")
                continue
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                problems.append(f"{where}: no heading #{frag}")
    return problems


def test_markdown_links_resolve_inside_the_repository():
    files = markdown_files()
    assert len(files) >= 10, files
    problems = [p for f in files for p in link_problems(f)]
    assert not problems, "\n".join(problems)


def test_link_check_catches_broken_links(tmp_path):
    root = tmp_path.resolve()
    (root / "docs").mkdir()
    (root / "docs" / "a.md").write_text("# Title\n\n## Some part\n")
    doc = root / "docs" / "b.md"
    doc.write_text(
        "[ok](a.md#some-part) [missing](c.md) [anchor](a.md#other)\n"
        "[outside](../../x.md)\n```\n[in code](nowhere.md)\n```\n"
    )
    problems = link_problems(doc, root)
    assert len(problems) == 3, problems
    assert "c.md: no such file" in problems[0]
    assert "no heading #other" in problems[1]
    assert "leaves the repository" in problems[2]


def outside_references(root):
    """Lines of the repository's tracked files that name a folder beside the checkout
    (`../NAME`), which a user's clone does not have."""
    siblings = sorted(p.name for p in root.parent.iterdir() if p.name != root.name)
    hits = []
    for name in siblings:
        out = subprocess.run(
            ["git", "grep", "-n", "-F", f"../{name}/", "--", "."],
            cwd=root,
            capture_output=True,
            text=True,
        )
        hits += out.stdout.splitlines()
    return hits


def test_nothing_points_outside_the_repository():
    hits = outside_references(ROOT)
    assert not hits, "files name folders outside the repository:\n" + "\n".join(hits)


def test_outside_reference_check_catches_one(tmp_path):
    repo = tmp_path / "repo"
    (tmp_path / "elsewhere").mkdir()
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "a.md").write_text("see ../elsewhere/notes.md\n")
    subprocess.run(["git", "add", "a.md"], cwd=repo, check=True)
    assert len(outside_references(repo)) == 1


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# ")
    body = [l for l in lines[1:] if l.strip()]
    assert body[0] == "```bash", body[:3]
    assert body[1].startswith("bash scripts/demo.sh"), body[1]
    assert body[2].startswith("bash scripts/test.sh"), body[2]
    assert body[3] == "```", body[3]
    # The test command is the one CI runs.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
