"""Every relative link of the project's Markdown files resolves inside the repository, and nothing cites
the method description by a name outside it."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line]


def test_relative_markdown_links_resolve():
    broken = []
    for md in tracked("*.md"):
        for target in LINK.findall(md.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # web links and anchors
            path = (md.parent / target.split("#")[0]).resolve()
            if not path.exists() or ROOT not in path.parents and path != ROOT:
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, "links that do not resolve inside the repository:\n" + "\n".join(broken)


def test_method_is_cited_inside_the_repository():
    assert (ROOT / "docs" / "method.md").is_file()
    outside = [str(p.relative_to(ROOT)) for ext in ("*.py", "*.md", "*.yaml", "*.sh") for p in tracked(ext)
               if "METHOD" + ".md" in p.read_text()]
    assert not outside, f"files citing a method description outside the repository: {outside}"
