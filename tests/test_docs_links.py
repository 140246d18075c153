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


PROJECT_PATH = re.compile(r"(?<![\w/.-])((?:saq|conf|docs|tests|experiments|results)/[\w./-]*\.(?:py|md|yaml|sh|json|png))")
OLD_COMMIT = re.compile(r"commit [0-9a-f]{7,40}")  # a path named with the commit that holds it
# Files that name paths on purpose without holding them: the history of changes, this test's own
# examples, and the optional per-user config (conf/local/, not tracked).
NOT_CHECKED = ("CHANGELOG.md", "tests/test_docs_links.py")
USER_FILES = ("conf/local/",)


def _named_paths(text: str) -> list[str]:
    return [m for line in text.splitlines() if not OLD_COMMIT.search(line) for m in PROJECT_PATH.findall(line)]


def test_project_paths_named_in_docs_docstrings_and_configs_exist():
    """A file path of this project named in Markdown, in Python (docstrings, comments) or in a config
    comment must exist, so that a reader who follows it finds the file."""
    missing = []
    for pattern in ("*.md", "*.py", "*.yaml", "*.sh"):
        for path in tracked(pattern):
            if str(path.relative_to(ROOT)) in NOT_CHECKED:
                continue
            for named in _named_paths(path.read_text()):
                if not named.startswith(USER_FILES) and not (ROOT / named).exists():
                    missing.append(f"{path.relative_to(ROOT)} names {named}")
    assert not missing, "paths that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_the_path_check_sees_a_missing_path():
    assert _named_paths("see saq/ptq/nowhere.py and results/x/y.json, not mysaq/a.py") == [
        "saq/ptq/nowhere.py", "results/x/y.json"]
    assert _named_paths("experiments/gone.py at commit abc1234") == []
