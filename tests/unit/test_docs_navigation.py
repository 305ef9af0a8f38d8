"""The docs a newcomer navigates: README.md is a front page of at most 300 lines that links
every page under docs/; every relative link in README.md, docs/*.md, BENCHMARKS.md and
kuberay/README.md reaches a file (and, with #anchor, a heading of it); every config key
they name in backticks (`model.backend`, `jobs.callback_allow_private`) is one AppConfig
has."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from serve_app.config import AppConfig

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
DOCS = [README, *PAGES, REPO / "BENCHMARKS.md", REPO / "kuberay" / "README.md"]

FENCE = re.compile(r"(?ms)^```.*?^```")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"(?m)^#{1,6} +(.+?) *#*$")
# A dotted name at the start of a backticked span, before the end, a colon, a space or "=".
KEY = re.compile(r"`([a-z_][a-z0-9_]*(?:\.(?:[a-z0-9_]+|\*))+)(?=[`:= ])")
FILE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".md", ".txt", ".gz", ".png", ".html",
                 ".toml", ".so", ".pem")


def prose(path: Path) -> str:
    """The text outside fenced code blocks (a `# comment` there is no heading)."""
    return FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(prose(path)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_slug_follows_github() -> None:
    assert slug("Quick start (fresh machine, Python 3.10+)") == (
        "quick-start-fresh-machine-python-310")
    assert slug("Live progress (Server-Sent Events)") == "live-progress-server-sent-events"
    assert slug("`model.backend` and the `cpu` extra") == "modelbackend-and-the-cpu-extra"


def test_readme_is_a_front_page_that_links_every_docs_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    linked = {(README.parent / target.split("#")[0]).resolve()
              for target in relative_links(README)}
    assert PAGES, "docs/ has pages"
    for page in PAGES:
        assert page.resolve() in linked, page.name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_a_heading(doc: Path) -> None:
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert broken == []


def _allowed_keys(model: type[BaseModel], prefix: str = "") -> tuple[set[str], set[str]]:
    """Every dotted key of the model, and the keys below which anything goes (dicts)."""
    keys: set[str] = set()
    open_ended: set[str] = set()
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.add(key)
        annotation = field.annotation
        args = typing.get_args(annotation) if isinstance(
            annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (
            annotation,)
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                sub_keys, sub_open = _allowed_keys(arg, key + ".")
                keys |= sub_keys
                open_ended |= sub_open
            elif typing.get_origin(arg) is dict or arg is typing.Any:
                open_ended.add(key)
    return keys, open_ended


def test_the_key_walk_knows_the_config() -> None:
    keys, open_ended = _allowed_keys(AppConfig)
    assert {"model.backend", "model.openvino.weights", "jobs.callback_allow_private",
            "jobs.broker.url", "replica.autoscaling.min_replicas"} <= keys
    assert "store.storage_options" in open_ended
    assert "model.no_such_key" not in keys


def named_keys(doc: Path) -> set[str]:
    fields = set(AppConfig.model_fields)
    return {key for key in KEY.findall(doc.read_text())
            if key.split(".")[0] in fields and not key.endswith(FILE_SUFFIXES)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_key_the_docs_name_is_in_app_config(doc: Path) -> None:
    keys, open_ended = _allowed_keys(AppConfig)
    unknown = []
    for key in sorted(named_keys(doc)):
        if key.endswith(".*"):
            known = key[:-2] in keys
        else:
            known = key in keys or any(key.startswith(o + ".") for o in open_ended)
        if not known:
            unknown.append(key)
    assert unknown == []


def test_the_docs_name_config_keys() -> None:
    """The key check above has something to check: the configuration page names the keys."""
    named = named_keys(REPO / "docs" / "configuration.md")
    assert {"model.backend", "jobs.broker.*", "store.ttl_s", "replica.num_cpus"} <= named


PATH_NAMED = re.compile(r"`((?:serve_app|tests|configs|kuberay|docker|dashboards|docs)/[^`\s:]*)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_the_docs_name_exists(doc: Path) -> None:
    """A file moved in the code (serve_app/optimize.py -> serve_app/model/optimize/) is
    moved in the docs too."""
    missing = [path for path in PATH_NAMED.findall(doc.read_text())
               if not any(c in path for c in "*<") and not (REPO / path).exists()]
    assert missing == []
