"""The shell programs clusterctl runs on the nodes, package data under clusterctl/deploy/scripts/*.sh:
each has a shebang, passes shellcheck in its shebang's dialect, and goes into the wheel. Finding
none is a failure, not a skip."""

from __future__ import annotations

import fnmatch
import importlib.resources
import shutil
import subprocess
import textwrap
import tomllib
from collections.abc import Mapping, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final

import pytest

REPO: Final = Path(__file__).resolve().parents[2]
SCRIPTS_PACKAGE: Final = "clusterctl.deploy"
SCRIPTS_DIR: Final = "scripts"
SCRIPTS_SRC: Final = REPO / "src" / Path(*SCRIPTS_PACKAGE.split(".")) / SCRIPTS_DIR
# shebang interpreter -> shellcheck's --shell
DIALECTS: Final[Mapping[str, str]] = {"sh": "sh", "dash": "dash", "bash": "bash", "ksh": "ksh"}


def find_scripts() -> dict[str, Traversable]:
    """The *.sh files of the scripts folder of the installed package; {} when there is none yet."""
    try:
        folder = importlib.resources.files(SCRIPTS_PACKAGE) / SCRIPTS_DIR
    except ModuleNotFoundError:
        return {}
    if not folder.is_dir():
        return {}
    return {t.name: t for t in sorted(folder.iterdir(), key=lambda t: t.name) if t.name.endswith(".sh") and t.is_file()}


SCRIPTS: Final = find_scripts()
NONE_FOUND: Final = f"no *.sh found in {SCRIPTS_PACKAGE}/{SCRIPTS_DIR} (importlib.resources), nor the package itself"
# With no scripts every test below still runs once, and fails.
PARAMS: Final[list[object]] = [*sorted(SCRIPTS)] or [pytest.param("", id="none-found")]


def script_text(name: str) -> str:
    assert name, NONE_FOUND
    return SCRIPTS[name].read_text(encoding="utf-8")


def dialect(text: str) -> str:
    """shellcheck's --shell for a script's shebang: `#!/bin/sh`, `#!/usr/bin/env bash`, `#!/bin/bash -eu`."""
    first = text.partition("\n")[0]
    if not first.startswith("#!"):
        raise ValueError(f"no shebang line: the first line is {first!r}")
    words = first[2:].split()
    if not words:
        raise ValueError("an empty shebang line")
    program = Path(words[0]).name
    if program == "env":
        program = next((Path(w).name for w in words[1:] if not w.startswith("-")), "")
    if program not in DIALECTS:
        raise ValueError(f"a shebang with no shell shellcheck knows: {first!r}")
    return DIALECTS[program]


def shellcheck_problems(script: Path) -> str:
    """'' when the script passes `shellcheck -x --severity=style` in its shebang's dialect, else what is wrong."""
    try:
        shell = dialect(script.read_text(encoding="utf-8"))
    except ValueError as e:
        return f"{script.name}: {e}"
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck is not installed (apt-get install shellcheck; tools/test.sh installs it)"
    proc = subprocess.run([exe, "-x", "--source-path=SCRIPTDIR", "--severity=style", "--color=never",
                           "-s", shell, script.name], cwd=script.parent, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return ""
    return f"shellcheck -s {shell} {script.name}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}"


# --- what the wheel holds (hatchling, the build backend in pyproject.toml) -------------------------


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    """gitignore-style enough for hatch's include/exclude: a pattern matches the path or a folder above it,
    anchored when it starts with '/'."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    for pattern in patterns:
        anchored = pattern.startswith("/")
        p = pattern.strip("/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, p) or (not anchored and "/" not in p
                                                   and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], p)):
                return True
    return False


def _vcs_ignored(rel: str) -> bool:
    """Hatch leaves out what the project's .gitignore ignores (unless ignore-vcs); tracked or not."""
    git = shutil.which("git")
    if not git or not (REPO / ".git").exists():
        return False
    proc = subprocess.run([git, "check-ignore", "-q", "--no-index", rel], cwd=REPO, check=False)
    return proc.returncode == 0


def wheel_excludes(rel: str, pyproject: Mapping[str, Any]) -> str:
    """'' when a file at `rel` (relative to the project root) goes into the wheel, else why not."""
    backend = pyproject.get("build-system", {}).get("build-backend", "")
    if backend != "hatchling.build":
        return f"build backend {backend!r}: this test knows only hatchling's rules; teach it the new ones"
    build = pyproject.get("tool", {}).get("hatch", {}).get("build", {})
    wheel = build.get("targets", {}).get("wheel", {})

    def option(key: str) -> list[str]:
        return list(wheel.get(key, build.get(key, [])))

    if any(rel == src or rel.startswith(src.rstrip("/") + "/") for src in wheel.get("force-include", {})):
        return ""
    chosen = option("only-include") or option("packages")
    if chosen and not any(rel == c or rel.startswith(c.rstrip("/") + "/") for c in chosen):
        return f"not under only-include/packages {chosen}"
    if option("include") and not _matches(rel, option("include")):
        return f"matches no include pattern {option('include')}"
    if _matches(rel, option("exclude")):
        return f"matches an exclude pattern {option('exclude')}"
    if not wheel.get("ignore-vcs", build.get("ignore-vcs", False)) and _vcs_ignored(rel):
        return "ignored by .gitignore, which hatch honours"
    return ""


# --- the tests ------------------------------------------------------------------------------------


def test_scripts_are_found() -> None:
    assert SCRIPTS, NONE_FOUND


@pytest.mark.parametrize("name", PARAMS)
def test_script_starts_with_a_shebang(name: str) -> None:
    first = script_text(name).partition("\n")[0]
    assert first.startswith("#!/"), f"{name}: the first line is {first!r}, not a shebang"
    dialect(first)


@pytest.mark.real
@pytest.mark.parametrize("name", PARAMS)
def test_script_passes_shellcheck(name: str) -> None:
    assert name, NONE_FOUND
    with importlib.resources.as_file(SCRIPTS[name]) as path:
        problems = shellcheck_problems(path)
    assert not problems, problems


@pytest.mark.parametrize("name", PARAMS)
def test_script_is_package_data(name: str) -> None:
    assert name, NONE_FOUND
    assert (SCRIPTS_SRC / name).is_file(), f"{name} is installed but not in {SCRIPTS_SRC.relative_to(REPO)}"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    rel = (SCRIPTS_SRC / name).relative_to(REPO).as_posix()
    why = wheel_excludes(rel, pyproject)
    assert not why, f"{rel} would not be in the wheel: {why}"


# --- the checks' own tests ------------------------------------------------------------------------


def write_script(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.mark.real
def test_shellcheck_catches_an_unquoted_dollar_at(tmp_path: Path) -> None:
    bad = write_script(tmp_path, "bad.sh", """\
        #!/bin/sh
        for f in $@; do
          printf '%s\\n' "$f"
        done
        """)
    problems = shellcheck_problems(bad)
    assert "SC2068" in problems, problems
    good = write_script(tmp_path, "good.sh", """\
        #!/bin/sh
        for f in "$@"; do
          printf '%s\\n' "$f"
        done
        """)
    assert shellcheck_problems(good) == ""


@pytest.mark.real
def test_the_dialect_comes_from_the_shebang(tmp_path: Path) -> None:
    body = 'if [[ -n "${1:-}" ]]; then\n  echo yes\nfi\n'
    assert shellcheck_problems(write_script(tmp_path, "b.sh", "#!/usr/bin/env bash\n" + body)) == ""
    problems = shellcheck_problems(write_script(tmp_path, "p.sh", "#!/bin/sh\n" + body))
    assert "shellcheck -s sh p.sh" in problems and "SC3010" in problems, problems
    assert "no shebang line" in shellcheck_problems(write_script(tmp_path, "n.sh", body))


@pytest.mark.real
def test_shellcheck_follows_a_sourced_file_next_to_the_script(tmp_path: Path) -> None:
    write_script(tmp_path, "lib.sh", "#!/bin/sh\n# shellcheck shell=sh\ngreeting=hello\n")
    main = write_script(tmp_path, "main.sh", '#!/bin/sh\n# shellcheck source=lib.sh\n. ./lib.sh\necho "$greeting"\n')
    assert shellcheck_problems(main) == ""


@pytest.mark.parametrize(("shebang", "shell"), [
    ("#!/bin/sh", "sh"), ("#!/bin/bash", "bash"), ("#!/usr/bin/env bash", "bash"), ("#!/bin/bash -eu", "bash"),
    ("#!/usr/bin/env -S bash -e", "bash"), ("#!/bin/dash", "dash"),
])
def test_dialects(shebang: str, shell: str) -> None:
    assert dialect(f"{shebang}\necho\n") == shell


@pytest.mark.parametrize("text", ["echo\n", "#!/usr/bin/env python3\n", "#!\n", ""])
def test_no_known_shell(text: str) -> None:
    with pytest.raises(ValueError):
        dialect(text)


@pytest.mark.parametrize(("config", "rel", "why"), [
    ({"packages": ["src/clusterctl"]}, "src/clusterctl/deploy/scripts/a.sh", ""),
    ({"packages": ["src/other"]}, "src/clusterctl/deploy/scripts/a.sh", "not under only-include/packages"),
    ({"packages": ["src/clusterctl"], "exclude": ["*.sh"]}, "src/clusterctl/deploy/scripts/a.sh", "exclude pattern"),
    ({"packages": ["src/clusterctl"], "include": ["*.py"]}, "src/clusterctl/deploy/scripts/a.sh", "include pattern"),
    ({"packages": ["src/clusterctl"], "include": ["/src/clusterctl/deploy/scripts"]},
     "src/clusterctl/deploy/scripts/a.sh", ""),
    ({"packages": ["src/other"], "force-include": {"src/clusterctl/deploy/scripts": "clusterctl/deploy/scripts"}},
     "src/clusterctl/deploy/scripts/a.sh", ""),
])
def test_wheel_rules(config: dict[str, Any], rel: str, why: str) -> None:
    pyproject = {"build-system": {"build-backend": "hatchling.build"},
                 "tool": {"hatch": {"build": {"targets": {"wheel": config}}}}}
    got = wheel_excludes(rel, pyproject)
    assert (why in got and bool(got) == bool(why)), got
    assert "knows only hatchling" in wheel_excludes(rel, {"build-system": {"build-backend": "setuptools.build_meta"}})
