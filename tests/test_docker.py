"""Static checks of docker/Dockerfile (no docker engine here): base, pins, user, port, health, install."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
CONSTRAINTS = REPO / "docker" / "constraints.txt"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_slim_pinned_python_base():
    froms = [args for keyword, args in instructions() if keyword == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", froms[0]), froms[0]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"


def test_every_dependency_pinned_and_used():
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), line
            pins[normalise(name)] = version
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        name = normalise(re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0])
        assert name in pins, f"{name} of pyproject.toml is not pinned in docker/constraints.txt"
    env = " ".join(args for keyword, args in instructions() if keyword == "ENV")
    assert "PIP_CONSTRAINT=/opt/perfline/docker/constraints.txt" in env
    copies = [args for keyword, args in instructions() if keyword == "COPY"]
    assert "docker/constraints.txt docker/constraints.txt" in copies


def test_install_is_the_readmes():
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    assert "pip install ." in runs
    readme = REPO / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet")
    # every pip install of the README's shell lines, also inside `a && b` chains
    commands = [part.strip() for line in readme.read_text().splitlines() for part in re.split(r"&&|;", line)]
    steps = {c for c in commands if re.match(r"(?:python3? -m )?pip install ", c)}
    plain = {re.sub(r"^(python3? -m )?", "", s) for s in steps}
    assert "pip install ." in plain, f"the README's install steps {sorted(steps)} do not include `pip install .`"


def test_every_package_folder_copied():
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copies = " ".join(args for keyword, args in instructions() if keyword == "COPY")
    for folder in {value.split("/")[0] for value in package_dir.values()}:
        assert re.search(rf"(^|\s){re.escape(folder)}\s+{re.escape(folder)}(\s|$)", copies), f"{folder} not copied"


def test_non_root_user_port_and_health():
    steps = instructions()
    keywords = [k for k, _ in steps]
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    # the user switch comes after the last install step, and nothing runs as root after it
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    useradd = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "useradd" in useradd and users[-1] in useradd
    assert ("EXPOSE", "9002") in steps
    health = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0] and "9002" in health[0]
    command = [args for keyword, args in steps if keyword == "CMD"]
    assert command and '"serve"' in command[-1] and '"0.0.0.0"' in command[-1] and '"9002"' in command[-1]


def test_build_context_filter():
    ignored = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".git" in ignored and "tests" in ignored
