"""The documentation a newcomer reads: a short README, a docs site that builds with every link and
anchor intact, `make help` naming every target, a module map naming every module, and no trace of
the machine the project was written on (its absolute paths, or text about it)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

from conftest import REPO

README_MAX_LINES = 200  # read in five minutes
# Folders that hold home directories and checkouts on common machines: a path into one is a path
# of the machine a file was written on, never one a reader has.
MACHINE_PATH = re.compile(r"(?<![\w.~<-])/(?:work|home|Users|root)/[\w.-]+")
MACHINE_TALK = re.compile(r"this machine|cannot be downloaded here|unreachable here|\.\./shared", re.IGNORECASE)
LINK = re.compile(r"\]\((?!https?:|#)([^)#\s]+)(?:#([^)\s]+))?\)")


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()]


def text_of(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def test_docs_site_builds_with_every_link_and_anchor_intact(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "params" / "index.html").is_file()


def test_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    for target, anchor in LINK.findall(text):
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (REPO / target).read_text(encoding="utf-8"), re.M)
            assert anchor in {slugify(h, "-") for h in headings}, f"README links to {target}#{anchor}: no such heading"


def test_no_tracked_file_holds_an_absolute_path_of_a_machine():
    own = [str(REPO.parent), str(Path.home())]  # the folder holding this checkout (and ../shared), the home
    found = []
    for path in tracked_files():
        text = text_of(path)
        found += [f"{path.relative_to(REPO)}: {hit}" for hit in MACHINE_PATH.findall(text)]
        found += [f"{path.relative_to(REPO)}: {folder}" for folder in own if len(folder) > 1 and folder + "/" in text]
    assert found == []


def test_docs_and_code_do_not_speak_of_the_machine_they_were_written_on():
    readers_see = [
        p
        for p in tracked_files()
        if p.suffix in (".md", ".py", ".yaml", ".yml", ".toml") and "tests" not in p.relative_to(REPO).parts
    ]
    assert [f"{p.relative_to(REPO)}: {hit}" for p in readers_see for hit in MACHINE_TALK.findall(text_of(p))] == []


def test_make_help_names_every_target():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    phony = set(re.search(r"^\.PHONY: (.+)$", makefile, re.M)[1].split())
    shown = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert {line.split()[0] for line in shown.splitlines() if line.strip()} == phony


def test_the_module_map_names_every_module():
    page = (REPO / "docs" / "development.md").read_text(encoding="utf-8")
    modules = [p for p in (REPO / "pipeline").rglob("*.py") if p.name != "__init__.py"]
    missing = [
        str(m.relative_to(REPO))
        for m in modules
        if f"`{m.name}`" not in page and f"`{m.relative_to(REPO)}`" not in page
    ]
    assert modules and missing == []
