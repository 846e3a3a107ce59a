"""The container recipe installs exactly the wheel CI builds, and nothing that compiles.

Why: no container engine runs here, so the image is proven by its inputs: the wheel CI builds
from this tree (built here the same way) must match the Dockerfile's COPY glob and carry every
package and data file the plugin loads at run time, and nothing else; the recipe must not bring
compilers, must drop root by default, and must start the console script pyproject declares.

What it does not do: build or run the image.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ground.wheel import build_wheel

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
PACKAGES = ("driver", "cdi", "mig", "sharing")
COMPILER_WORDS = (
    "gcc",
    "g++",
    "clang",
    "build-essential",
    "make",
    "cmake",
    "python3-dev",
    "libc6-dev",
    "musl-dev",
)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


def _instructions() -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        out.append(Instruction(keyword.upper(), args.strip(), stage))
    return out


def _final_stage() -> list[Instruction]:
    instrs = _instructions()
    last = max(i.stage for i in instrs)
    return [i for i in instrs if i.stage == last]


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _project() -> dict[str, object]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return project


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel as CI builds it, from a copy of the tree (other work in the tree is left alone)."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _copy_glob() -> str:
    """The Dockerfile's wheel source pattern (the one COPY from the build context ending in .whl)."""
    copies = [i for i in _instructions() if i.keyword == "COPY" and not i.args.startswith("--from")]
    sources = [arg for i in copies for arg in i.args.split()[:-1] if arg.endswith(".whl")]
    assert len(sources) == 1, f"expected exactly one wheel COPY from the build context, got {copies}"
    return sources[0]


def test_wheel_name_matches_the_dockerfile_copy(wheel: Path) -> None:
    project = _project()
    dist_name = re.sub(r"[-_.]+", "_", str(project["name"])).lower()
    assert wheel.name == f"{dist_name}-{project['version']}-py3-none-any.whl"
    assert fnmatch.fnmatch(f"dist/{wheel.name}", _copy_glob())


def test_only_the_wheel_enters_the_image() -> None:
    copies = [i for i in _instructions() if i.keyword in ("COPY", "ADD")]
    for instr in copies:
        assert instr.keyword == "COPY", f"ADD fetches or unpacks implicitly; use COPY: {instr.args}"
        if not instr.args.startswith("--from"):
            sources = instr.args.split()[:-1]
            assert all(s.endswith(".whl") for s in sources), (
                f"source tree copied into the image: {instr.args}"
            )
    final_copies = [i for i in _final_stage() if i.keyword == "COPY"]
    assert final_copies, "the final stage must copy the installed environment"
    assert all(i.args.startswith("--from=") for i in final_copies)


def test_pip_installs_binary_wheels_only_and_the_copied_wheel() -> None:
    runs = " ".join(i.args for i in _instructions() if i.keyword == "RUN")
    installs = re.findall(r"pip install ([^&;]*)", runs)
    assert installs, "no pip install in the Dockerfile"
    for args in installs:
        assert "--only-binary=:all:" in args, f"sdists would need a compiler: pip install {args}"
        assert fnmatch.fnmatch(
            next(a for a in args.split() if a.endswith(".whl")).replace("/tmp/wheels/", "dist/"), _copy_glob()
        )


def test_wheel_contains_the_packages_and_their_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == set(PACKAGES), f"unexpected top-level entries in the wheel: {sorted(tops)}"
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names
        assert f"{package}/py.typed" in names
    topologies = sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / "driver/nvml/topologies").glob("*.yaml")
    )
    assert topologies, "the source tree has no fake topologies"
    assert set(topologies) <= names
    assert "driver/nvml/data/mig-profiles.yaml" in names
    # Every module of the source packages ships (a missing sub-package would break at run time).
    sources = {
        p.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources - names == set()
    assert not any(n.startswith(("tests/", "benchmarks/", "proto/", "deploy/")) for n in names)


def test_wheel_metadata_matches_pyproject(wheel: Path) -> None:
    project = _project()
    with zipfile.ZipFile(wheel) as zf:
        info = f"{wheel.name.split('-')[0]}-{project['version']}.dist-info"
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    scripts = project["scripts"]
    assert isinstance(scripts, dict)
    assert scripts == {"gpu-dra": "driver.cli:main"}
    assert re.search(r"^gpu-dra = driver\.cli:main$", entry_points, re.MULTILINE)
    requires = set(re.findall(r"^Requires-Dist: ([^;\n]+)$", metadata, re.MULTILINE))
    deps = project["dependencies"]
    assert isinstance(deps, list)
    for dep in deps:
        name = re.split(r"[<>=!~ ]", dep, maxsplit=1)[0]
        assert any(r.replace(" ", "").startswith(name) for r in requires), f"{dep} not required by the wheel"


def test_entrypoint_is_the_console_script() -> None:
    entrypoints = [i for i in _final_stage() if i.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    argv = json.loads(entrypoints[0].args)  # exec form: no shell between the runtime and the plugin
    scripts = _project()["scripts"]
    assert isinstance(scripts, dict)
    assert argv == ["gpu-dra"]
    assert argv[0] in scripts
    env = " ".join(i.args for i in _final_stage() if i.keyword == "ENV")
    assert re.search(r"PATH=/opt/gpu-dra/bin:", env), "the venv holding the console script must be on PATH"


def test_runs_as_non_root_user() -> None:
    users = [i.args for i in _final_stage() if i.keyword == "USER"]
    assert users, "the final stage sets no USER, so the image runs as root"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0")


def test_no_compilers_and_a_slim_python_that_satisfies_requires_python() -> None:
    text = " ".join(f"{i.keyword} {i.args}" for i in _instructions())
    words = set(re.split(r"[\s=&;|\\]+", text))
    assert words.isdisjoint(COMPILER_WORDS), sorted(words & set(COMPILER_WORDS))
    base = next(i.args for i in _instructions() if i.keyword == "ARG" and i.args.startswith("PYTHON_IMAGE="))
    image = base.split("=", 1)[1]
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", image)
    assert match, f"base image {image!r} is not a slim python image"
    required = re.fullmatch(r">=(\d+)\.(\d+)", str(_project()["requires-python"]))
    assert required
    assert (int(match[1]), int(match[2])) >= (int(required[1]), int(required[2]))


# -- the local build (tests/ground/images.py) runs this recipe, not a copy of it ----------------


def test_the_local_build_runs_every_instruction_of_the_dockerfile() -> None:
    from tests.ground import images

    stages = images.plan(DOCKERFILE.read_text())
    runs = [i.args for i in _instructions() if i.keyword == "RUN"]
    assert [st["cmd"] for s in stages for st in s.steps if st["op"] == "RUN"] == runs
    copies = [i.args for i in _instructions() if i.keyword == "COPY"]
    planned = [st for s in stages for st in s.steps if st["op"] == "COPY"]
    assert len(planned) == len(copies)
    for step, args in zip(planned, copies, strict=True):
        words = args.split()
        assert step["dest"] == words[-1]
        assert step["src"] == [w for w in words[:-1] if not w.startswith("--from=")]
    final = stages[-1]
    entry = next(i for i in _final_stage() if i.keyword == "ENTRYPOINT")
    assert final.entrypoint == tuple(json.loads(entry.args))
    assert final.user == next(i.args for i in _final_stage() if i.keyword == "USER")
    env = " ".join(i.args for i in _final_stage() if i.keyword == "ENV")
    for key in re.findall(r"(\w+)=", env):
        assert key in final.env, f"ENV {key} of the Dockerfile is missing from the local build's image"
    labels = " ".join(i.args for i in _final_stage() if i.keyword == "LABEL")
    assert set(re.findall(r"([\w.]+)=", labels)) == set(final.labels)


def test_the_local_base_stands_in_for_the_dockerfiles_from_image() -> None:
    from tests.ground import images

    stages = images.plan(DOCKERFILE.read_text())
    names = {s.name for s in stages}
    bases = {s.base for s in stages if s.base not in names}
    assert bases, "the Dockerfile names no base image"
    for base in bases:
        assert base in images.BASES, f"no local stand-in for {base} in tests/ground/images.py BASES"
        tag = re.fullmatch(r"python:(\d+\.\d+)-slim-(\w+)", base)
        assert tag, base
        assert images.BASES[base]["python"] == tag[1]
        assert images.BASES[base]["suite"] == tag[2]


@pytest.mark.parametrize("line", ["ADD dist/x.whl /tmp/", "HEALTHCHECK CMD true", "COPY --chown=1:1 a /b"])
def test_the_local_build_refuses_what_it_cannot_run(line: str) -> None:
    from tests.ground import images

    with pytest.raises(images.ImageBuildError, match="not supported"):
        images.plan(f"FROM python:3.11-slim-bookworm\n{line}\n")
