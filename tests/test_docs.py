"""The README and every docs page as a reader meets them: each Python block runs as written, each shell command
names files, modules, flags and extras that exist, and the site builds with warnings as errors.

A Python block is a complete program unless the line before it is ``<!-- fragment: PATH -->``, which says the
block is an excerpt of ``PATH`` (an example or test that runs it whole); then ``PATH`` must exist. Programs run in
a fresh interpreter from a scratch directory with the clone on ``PYTHONPATH`` (as a file saved in the clone root
would), so one block's names never leak into the next.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts]
FENCE = re.compile(r"^(`{3,})(\w*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
FRAGMENT = re.compile(r"<!--\s*fragment:\s*(.*?)\s*-->\s*$")
PY_TIMEOUT = 900


def _blocks(lang: set[str]) -> list[tuple[str, str, str | None]]:
    """``(id, code, fragment_of)`` for each fenced block in ``lang``; the id is ``page:line``."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(2) not in lang:
                continue
            line = text.count("\n", 0, m.start()) + 1
            before = text[: m.start()].rstrip().rsplit("\n", 1)[-1]
            frag = FRAGMENT.search(before)
            out.append((f"{page.relative_to(ROOT)}:{line}", m.group(3), frag.group(1) if frag else None))
    return out


PY_BLOCKS = _blocks({"python"})
SH_BLOCKS = _blocks({"bash", "sh", "shell", "console"})


def test_the_docs_have_blocks_to_check():
    assert len(PAGES) >= 10, [str(p) for p in PAGES]
    assert len([b for b in PY_BLOCKS if b[2] is None]) >= 10
    assert len(SH_BLOCKS) >= 5


@pytest.mark.parametrize("where,code,fragment_of", [pytest.param(*b, id=b[0]) for b in PY_BLOCKS if b[2] is not None])
def test_fragment_names_the_file_that_runs_it(where, code, fragment_of):
    for path in re.split(r"[,\s]+", fragment_of.strip()):
        assert (ROOT / path.split("::")[0]).exists(), f"{where}: fragment of {path!r}, which does not exist"


@pytest.mark.parametrize("where,code", [pytest.param(*b[:2], id=b[0]) for b in PY_BLOCKS if b[2] is None])
def test_python_block_runs_as_written(where, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-"], input=code, text=True, capture_output=True, cwd=tmp_path, env=env, timeout=PY_TIMEOUT
    )
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------------ shell commands


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, split on ``&&``, ``||``, ``;``
    and ``|`` outside quotes (a quoted command, e.g. ``--command="cd x && ..."``, is checked as its own block)."""
    code = re.sub(r"\\\n", " ", code)
    cmds = []
    for line in code.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            tokens = list(lex)
        except ValueError:
            cmds.append(line)  # unbalanced quotes: check_command reports it
            continue
        current: list[str] = []
        for tok in tokens:
            if tok and set(tok) <= set(";&|"):
                if current:
                    cmds.append(shlex.join(current))
                current = []
            else:
                current.append(tok)
        if current:
            cmds.append(shlex.join(current))
        for tok in tokens:  # commands quoted inside an argument (ssh/gcloud --command="...")
            m = re.match(r"--command=(.*)", tok, re.S)
            if m:
                cmds.extend(_commands(m.group(1)))
    return cmds


def check_command(cmd: str, activated: bool) -> list[str]:
    """What is wrong with one shell command from the docs (empty when nothing is)."""
    try:
        argv = shlex.split(cmd)
    except ValueError as e:
        return [f"{cmd!r}: {e}"]
    while argv and re.fullmatch(r"\w+=\S*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if not argv:
        return []
    problems = []
    prog = argv[0]
    if prog in ("python", "pip", "pytest") and not activated:
        problems.append(f"{cmd!r}: bare `{prog}` runs outside the venv; write .venv/bin/{prog} or activate it first")
    if prog.endswith("python") or prog.endswith("python3"):
        args = argv[1:]
        if args[:2] == ["-m", "venv"] or args[:2] == ["-m", "pip"] or args[:2] == ["-m", "pytest"]:
            if args[:2] == ["-m", "pip"]:
                problems += _check_pip(cmd, args[2:])
            return problems
        script = None
        if args[:1] == ["-m"]:
            if not (ROOT / args[1].split(".")[0]).exists():  # an installed tool (sphinx, pip...), not ours
                return problems
            script = ROOT / (args[1].replace(".", "/") + ".py")
            if not script.exists():
                script = ROOT / args[1].replace(".", "/") / "__main__.py"
            rest = args[2:]
        elif args and args[0].endswith(".py"):
            script, rest = ROOT / args[0], args[1:]
        else:
            return problems
        if not script.exists():
            return [*problems, f"{cmd!r}: {script.relative_to(ROOT)} does not exist"]
        source = script.read_text()
        for flag in [a.split("=")[0] for a in rest if a.startswith("--")]:
            if f'"{flag}"' not in source and f"'{flag}'" not in source:
                problems.append(f"{cmd!r}: {script.relative_to(ROOT)} has no flag {flag}")
    elif prog.endswith("pip"):
        problems += _check_pip(cmd, argv[1:])
    return problems


def _check_pip(cmd: str, args: list[str]) -> list[str]:
    problems = []
    for a in args:
        m = re.fullmatch(r"\.?\[([\w,-]+)\]", a) or re.fullmatch(r"jaxpeft\[([\w,-]+)\]", a)
        if m:
            for extra in m.group(1).split(","):
                if extra not in _extras():
                    problems.append(f"{cmd!r}: pyproject.toml has no extra {extra!r}")
            if a.startswith("jaxpeft["):
                problems.append(f'{cmd!r}: jaxpeft is not on PyPI; from a clone write -e ".[{m.group(1)}]"')
    return problems


@pytest.mark.parametrize("where,code", [pytest.param(*b[:2], id=b[0]) for b in SH_BLOCKS])
def test_shell_block_names_real_files_flags_and_extras(where, code):
    activated = "source .venv/bin/activate" in code or ". .venv/bin/activate" in code
    problems = [p for c in _commands(code) for p in check_command(c, activated)]
    assert not problems, f"{where}:\n" + "\n".join(problems)


def test_inline_commands_in_prose_run_from_a_fresh_clone():
    problems = []
    for page in PAGES:
        prose = FENCE.sub("", page.read_text())
        for span in re.findall(r"`([^`\n]+)`", prose):
            if re.match(r"(\.venv/bin/)?(python3?|pip) \S", span) and not span.startswith("python3 -m venv"):
                problems += [f"{page.relative_to(ROOT)}: {p}" for p in check_command(span, activated=False)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_a_reader_would_trip_on():
    assert check_command("python examples/quickstart.py", activated=False)  # bare python
    assert not check_command(".venv/bin/python examples/quickstart.py --method lora", activated=False)
    assert check_command(".venv/bin/python examples/quickstart.py --no-such-flag", activated=False)
    assert check_command(".venv/bin/python examples/nope.py", activated=False)
    assert check_command('.venv/bin/pip install -e ".[nope]"', activated=False)
    assert check_command("pip install jaxpeft[interop]", activated=True)
    assert not check_command("python examples/quickstart.py", activated=True)
    assert _commands('gcloud x --command="cd jaxpeft && .venv/bin/python examples/nope.py"  # go') == [
        "gcloud x '--command=cd jaxpeft && .venv/bin/python examples/nope.py'",
        "cd jaxpeft",
        ".venv/bin/python examples/nope.py",
    ]


# ------------------------------------------------------------------------------------------------ the site


def test_site_builds_without_warnings(tmp_path):
    if not os.environ.get("CI"):  # CI installs the docs extra: there a missing Sphinx fails
        pytest.importorskip("sphinx", reason='the docs extra: .venv/bin/pip install -e ".[docs]"')
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html", "docs", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "index.html").exists() and (tmp_path / "api.html").exists()


def test_readme_links_point_at_files_that_exist():
    text = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://|#", t)]
    assert len(links) >= 15, links
    missing = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_test_the_docs_name_exists():
    """A guarantee names the test that proves it; a renamed or deleted test would leave the promise unbacked."""
    named = set()
    for page in PAGES:
        named |= set(re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", page.read_text()))
    assert len(named) >= 30
    missing = []
    for path, name in sorted(named):
        if not (ROOT / path).exists():
            missing.append(path)
        elif name and not re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"the docs name tests that do not exist: {missing}"
