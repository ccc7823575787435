"""Lint-level checks of docker/: the Dockerfile's text, .dockerignore, the Apptainer definition and
the op-prebuild script's early exits. No Docker daemon needed; docker/check_image.sh builds and runs
the image for real (a developer check, see docker/README.md)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib

needs_tomllib = pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+, like the image's")
REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
BASH = shutil.which("bash") or "/bin/bash"


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comment lines dropped
    (Docker drops comment lines inside a continued instruction too)."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"docker/Dockerfile ends inside a continued instruction: {pending!r}"
    return result


def index_of(steps: list[tuple[str, str]], keyword: str, contains: str = "") -> int:
    for i, (kw, args) in enumerate(steps):
        if kw == keyword and contains in args:
            return i
    raise AssertionError(f"docker/Dockerfile has no {keyword} containing {contains!r}")


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions((DOCKER / "Dockerfile").read_text())


def test_base_image_is_a_build_arg_with_a_cuda_devel_default(steps: list[tuple[str, str]]) -> None:
    arg = index_of(steps, "ARG", "BASE_IMAGE=")
    assert arg < index_of(steps, "FROM")
    assert steps[index_of(steps, "FROM")][1] == "${BASE_IMAGE}"
    default = steps[arg][1].split("=", 1)[1]
    # nvcc for the op prebuild, and CUDA 13 like torch 2.14.1's wheels (DeepSpeed compares them).
    assert "cuda" in default and "devel" in default and ":13." in default, default


def test_every_pip_install_uses_the_constraints_file(steps: list[tuple[str, str]]) -> None:
    runs = [args for kw, args in steps if kw == "RUN" and "pip install" in args]
    script = (DOCKER / "prebuild_ds_ops.sh").read_text()
    script_installs = [line for line in script.splitlines() if "pip install" in line and not line.startswith("#")]
    assert len(runs) == 2 and len(script_installs) == 2
    for command in runs + script_installs:
        for install in command.split("pip install")[1:]:
            assert "-c constraints.txt" in install.split("&&")[0], command
    copy = index_of(steps, "COPY", "constraints.txt")
    assert copy < index_of(steps, "RUN", "pip install")


@needs_tomllib
def test_runtime_requirements_are_pyprojects_dependencies_without_dev(steps: list[tuple[str, str]]) -> None:
    """Runs the Dockerfile's own extraction command against the real pyproject.toml."""
    run = steps[index_of(steps, "RUN", "tomllib")][1]
    command = run.split(">")[0].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"]
    out = subprocess.run([sys.executable, "-c", argv[2]], cwd=REPO, capture_output=True, text=True, check=True)
    listed = out.stdout.split("\n")[:-1]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert listed == project["dependencies"]
    assert not set(listed) & set(project["optional-dependencies"]["dev"])
    assert "[dev]" not in " ".join(args for _, args in steps)


def test_layers_run_from_dependencies_to_source(steps: list[tuple[str, str]]) -> None:
    deps_copy = index_of(steps, "COPY", "pyproject.toml")
    deps_install = index_of(steps, "RUN", "-r /tmp/runtime-requirements.txt")
    prebuild = index_of(steps, "RUN", "prebuild_ds_ops.sh")
    source_copy = index_of(steps, "COPY", "pipeline/")
    project_install = index_of(steps, "RUN", "--no-deps -c constraints.txt .")
    assert deps_copy < deps_install < prebuild < source_copy < project_install
    assert "pipeline/" not in steps[deps_copy][1]
    # apt caches and pip caches stay out of the layers.
    assert all("--no-cache-dir" in args for kw, args in steps if kw == "RUN" and "pip install" in args)
    assert "rm -rf /var/lib/apt/lists/*" in steps[index_of(steps, "RUN", "apt-get install")][1]


def test_the_image_runs_as_a_non_root_user(steps: list[tuple[str, str]]) -> None:
    users = [i for i, (kw, _) in enumerate(steps) if kw == "USER"]
    assert users, "docker/Dockerfile sets no USER: the container would run as root"
    last = users[-1]
    assert steps[last][1] not in {"root", "0", "0:0"}
    assert f'useradd --create-home --uid "${{PIPELINE_UID}}" --shell /bin/bash {steps[last][1]}' in " ".join(
        args for kw, args in steps if kw == "RUN"
    )
    starts = [i for i, (kw, _) in enumerate(steps) if kw in {"CMD", "ENTRYPOINT"}]
    assert starts and all(last < i for i in starts)
    assert all(kw != "RUN" for kw, _ in steps[last:]), "a RUN after USER would need root"


def test_no_secrets_in_the_image(steps: list[tuple[str, str]]) -> None:
    secret = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
    for kw, args in steps:
        if kw in {"ENV", "ARG", "LABEL"}:
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) + args.split()[:1]:
                assert not secret.search(name), f"docker/Dockerfile: {kw} {name} looks like a secret"
        if kw in {"COPY", "ADD"}:
            assert not re.search(r"\.env\b|netrc|id_rsa|credentials|\.pem\b", args), f"{kw} {args}"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", "runs/smoke/checkpoints/latest", ".git/HEAD", "pipeline/__pycache__/vit.cpython-311.pyc",
     "tests/conftest.py", "test-artifacts/x.png", "vit_pipeline.egg-info/PKG-INFO", ".env", "pipeline.sif"],
)  # fmt: skip
def test_dockerignore_leaves_out(path: str, ignore_patterns: list[str]) -> None:
    assert dockerignored(path, ignore_patterns), f".dockerignore lets {path} into the build context"


def test_dockerignore_keeps_every_file_the_dockerfile_copies(
    steps: list[tuple[str, str]], ignore_patterns: list[str]
) -> None:
    sources = [src for kw, args in steps if kw == "COPY" for src in args.split()[:-1] if not src.startswith("--")]
    assert "constraints.txt" in sources and "pipeline/" in sources
    for src in sources:
        files = [p for p in (REPO / src).rglob("*") if p.is_file()] if (REPO / src).is_dir() else [REPO / src]
        assert files, f"COPY {src}: nothing in the repository"
        kept = [f for f in files if "__pycache__" not in f.parts]
        for f in kept:
            relative = f.relative_to(REPO).as_posix()
            assert not dockerignored(relative, ignore_patterns), f"COPY {src} needs {relative}; .dockerignore drops it"


@needs_tomllib
def test_apptainer_definition_bootstraps_from_the_docker_image() -> None:
    text = (DOCKER / "pipeline.def").read_text()
    header = dict(
        line.split(":", 1) for line in text.splitlines() if re.match(r"^(Bootstrap|From):", line)
    )  # fmt: skip
    assert header["Bootstrap"].strip() in {"docker-daemon", "docker"}
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert header["From"].strip() == f"vit-pipeline:{version}"
    sections = set(re.findall(r"^%(\w+)", text, re.MULTILINE))
    assert {"environment", "runscript", "test"} <= sections
    environment = text.split("%environment", 1)[1].split("\n%", 1)[0]
    assert "export PATH=/opt/venv/bin:$PATH" in environment
    readme = (DOCKER / "README.md").read_text()
    assert f"-t vit-pipeline:{version}" in readme and "apptainer build pipeline.sif docker/pipeline.def" in readme


@pytest.mark.parametrize("script", ["check_image.sh", "prebuild_ds_ops.sh"])
def test_shell_scripts_parse(script: str) -> None:
    out = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _run_prebuild(tmp_path: Path, ops: str) -> subprocess.CompletedProcess[str]:
    """The script with a PATH of our own: nothing on it can install into the developer's venv."""
    return subprocess.run(
        [BASH, str(DOCKER / "prebuild_ds_ops.sh"), ops],
        env={**os.environ, "PATH": str(tmp_path)}, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.timeout(30)
def test_prebuild_is_skipped_with_a_message_when_off_or_without_nvcc(tmp_path: Path) -> None:
    off = _run_prebuild(tmp_path, "")
    assert off.returncode == 0 and "prebuild off (DS_PREBUILD_OPS is empty)" in off.stdout
    no_nvcc = _run_prebuild(tmp_path, "CPU_ADAM FUSED_ADAM")
    assert no_nvcc.returncode == 0
    assert "no nvcc in this base image; skipping the prebuild of CPU_ADAM FUSED_ADAM" in no_nvcc.stdout


@pytest.mark.timeout(60)
def test_prebuild_refuses_an_unknown_op_before_building(tmp_path: Path) -> None:
    tools = {
        "python": f'exec {sys.executable} "$@"',  # this venv's, with deepspeed (a symlink would lose the venv)
        "nvcc": "exit 0",  # a stand-in: the script only asks whether nvcc is there
        "pip": "echo 'pip was called' >&2; exit 97",  # must not be reached
    }
    for name, body in tools.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    out = _run_prebuild(tmp_path, "CPU_ADAM FUSD_ADAM")
    assert out.returncode == 1
    assert "DS_PREBUILD_OPS: unknown op(s) ['FUSD_ADAM']; choose from [" in out.stderr
    assert "'FUSED_ADAM'" in out.stderr and "pip was called" not in out.stderr
