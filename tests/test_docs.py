"""The docs cannot go stale: every `lmforge` command in README.md and docs/*.md goes through the real CLI.

Each command line in a ```bash / ```sh / ```shell / ```console block is split as the shell would, matched
to `lmforge.cli.COMMANDS` and parsed into its config by `parse_config` (recipe files included), so a
renamed or removed flag, command or recipe fails here with the doc file and line; `lmforge ...` spans in
prose must name a real command and real flags. A block right after a `<!-- docs-test: run -->` comment is
also executed, line by line, in a fresh directory that holds a small `corpus.jsonl` (`run slow` for blocks
too slow for the fast loop), and `--help` lines are run. Module names and repository paths the prose points
at must exist, links between the pages must resolve, and the README stays a landing page, not a manual.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from lmforge.cli import COMMANDS, main
from lmforge.core.config import leaf_keys, parse_config, suggest
from lmforge.core.errors import LmforgeError

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
RUN_MARK = re.compile(r"<!--\s*docs-test:\s*run(?P<slow>\s+slow)?\s*-->")
FENCE = re.compile(r"^\s*```\s*(?P<lang>[\w-]*)")
OPERATORS = {";", "&&", "||", "|", "&"}
README_MAX_LINES = 200
CODE_SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"\blmforge(?:\.[A-Za-z_]\w*)+")
# tests/ is left out: the test tree is reorganized separately, and a missing test file fails loudly anyway
REPO_PATH = re.compile(r"(?<![\w/.])(?:lmforge|benchmarks|recipes|scripts)/[\w./-]*[\w/]")


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/data.md:12", the line the command starts on
    argv: tuple[str, ...]  # the words after `lmforge`
    run: str  # "" (parse only), "fast" or "slow": the block is executed by the docs test
    block: int  # index of its code block in the file (runnable lines of one block share a directory)
    inline: bool = False  # an `lmforge ...` span in prose: may leave out required options, flags must exist


def _logical_lines(lines: Sequence[tuple[int, str]], console: bool) -> Iterator[tuple[int, str]]:
    """(first line number, text) per shell command line: backslash continuations joined, console output skipped."""
    start, buf = 0, ""
    for number, line in lines:
        if not buf:
            if console and not line.lstrip().startswith("$ "):
                continue
            start = number
            line = line.lstrip().removeprefix("$ ") if console else line
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf = ""
    if buf:
        yield start, buf


def _simple_commands(text: str) -> list[list[str]]:
    """The words of each simple command in a shell line (split at ; && || | &), comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in OPERATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def lmforge_argv(words: Sequence[str]) -> list[str] | None:
    """The arguments `lmforge` receives from one simple command, or None if it does not run lmforge.

    Knows `lmforge ...`, `.venv/bin/lmforge ...`, `python -m lmforge ...`, `torchrun ... -m lmforge ...`
    and `./scripts/quickstart.sh ...` (which runs `lmforge quickstart`).
    """
    words = list(words)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words.pop(0)
    if not words:
        return None
    if Path(words[0]).name == "lmforge":
        return words[1:]
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1] == "lmforge":
            return words[i + 2:]
    for i, word in enumerate(words):
        if word.endswith("scripts/quickstart.sh"):
            return ["quickstart", *words[i + 1:]]
    return None


@dataclass(frozen=True)
class DocLine:
    number: int
    text: str
    lang: str | None  # the code block's language ("" for a bare fence), None outside code blocks
    run: str  # the block's run mark: "", "fast" or "slow"
    block: int  # index of the code block (0 outside)


def doc_lines(path: Path) -> Iterator[DocLine]:
    """Every line of a markdown file that is not a fence, with the code block it belongs to."""
    lang: str | None = None
    mark = run = ""
    block = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if fence and lang is None:
            lang, run, mark, block = fence["lang"], mark, "", block + 1
        elif fence:
            lang, run = None, ""
        elif lang is None:
            if line.strip():
                m = RUN_MARK.search(line)
                mark = ("slow" if m["slow"] else "fast") if m else ""
            yield DocLine(number, line, None, "", 0)
        else:
            yield DocLine(number, line, lang, run, block)


def doc_commands(path: Path) -> list[DocCommand]:
    """Every lmforge command line in the shell blocks of one markdown file, and inline `lmforge ...` spans."""
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    found: list[DocCommand] = []
    blocks: dict[int, list[DocLine]] = {}
    for line in doc_lines(path):
        if line.lang in SHELL_BLOCKS:
            blocks.setdefault(line.block, []).append(line)
        elif line.lang is None:
            for span in CODE_SPAN.findall(line.text):
                if re.match(r"lmforge [a-z-]", span) and "<" not in span:
                    found.append(DocCommand(f"{name}:{line.number}", tuple(shlex.split(span)[1:]), "", 0, inline=True))
    for block, lines in blocks.items():
        numbered = [(line.number, line.text) for line in lines]
        for start, text in _logical_lines(numbered, console=lines[0].lang == "console"):
            for words in _simple_commands(text):
                argv = lmforge_argv(words)
                if argv is not None:
                    found.append(DocCommand(f"{name}:{start}", tuple(argv), lines[0].run, block))
    return sorted(found, key=lambda c: int(c.where.rsplit(":", 1)[1]))


def check_command(cmd: DocCommand) -> str | None:
    """Parse a doc command with the real CLI; the error (naming the doc line) or None when it parses."""
    argv = list(cmd.argv)
    if not argv or argv[0] in ("-h", "--help", "help", "-V", "--version"):
        return None
    if len(argv) == 1 and any(name.startswith(argv[0] + " ") for name in COMMANDS):
        return None  # a command group named in prose, e.g. `lmforge convert`
    name = next((" ".join(argv[:n]) for n in (2, 1) if " ".join(argv[:n]) in COMMANDS), None)
    if name is None:
        return f"{cmd.where}: unknown command 'lmforge {' '.join(argv[:2])}'"
    command = COMMANDS[name]
    config = getattr(importlib.import_module(command.module), command.config)
    rest = argv[len(name.split()):]
    try:
        if cmd.inline or "-h" in rest or "--help" in rest:
            known = {"--help", "--print-config"} | {f"--{k}" for k in leaf_keys(config)}
            known |= {f"--{k.replace('_', '-')}" for k in leaf_keys(config)}
            unknown = [f for f in (w.split("=", 1)[0] for w in rest if w.startswith("--")) if f not in known]
            if unknown:
                return f"{cmd.where}: {' '.join(['lmforge', *argv])}\n  unknown option {unknown[0]}" + (
                    f" (did you mean '--{hint}'?)" if (hint := suggest(unknown[0], leaf_keys(config))) else "")
        else:
            parse_config(config, rest, prog=f"lmforge {name}", recipe=command.recipe)
    except LmforgeError as e:
        return f"{cmd.where}: {' '.join(['lmforge', *argv])}\n  {e}"
    return None


ALL_COMMANDS = [c for path in DOC_FILES for c in doc_commands(path)]


def test_the_docs_exist_and_show_commands():
    assert (ROOT / "docs").is_dir() and len(DOC_FILES) > 5
    assert len(ALL_COMMANDS) > 50, "the command extraction found almost nothing: is the fence syntax right?"
    assert {c.argv[0] for c in ALL_COMMANDS if c.argv} >= {"quickstart", "pretrain", "sft", "generate", "serve"}


@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=[c.where for c in ALL_COMMANDS])
def test_doc_command_parses(cmd: DocCommand, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # recipe paths in the docs are relative to the repository root
    error = check_command(cmd)
    assert error is None, error


HELP_COMMANDS = [c for c in ALL_COMMANDS if {"-h", "--help"} & set(c.argv)]


@pytest.mark.parametrize("cmd", HELP_COMMANDS, ids=[c.where for c in HELP_COMMANDS])
def test_doc_help_runs(cmd: DocCommand, capsys: pytest.CaptureFixture[str]):
    try:
        rc = main(list(cmd.argv))
    except SystemExit as e:  # a command's --help exits through argparse
        rc = e.code or 0
    assert rc == 0 and "usage: lmforge" in capsys.readouterr().out, cmd.where


# ----------------------------------------------------------------------------------------------
# runnable blocks


def _write_corpus(directory: Path) -> None:
    """Prose every Python has: the pydoc topic pages (~80 documents, 0.5 MB), enough for second-long runs."""
    with open(directory / "corpus.jsonl", "w", encoding="utf-8") as f:
        for key in sorted(topics):
            f.write(json.dumps({"text": topics[key]}) + "\n")


def _runnable_blocks(speed: str) -> list[list[DocCommand]]:
    blocks: dict[tuple[str, int], list[DocCommand]] = {}
    for cmd in ALL_COMMANDS:
        if cmd.run == speed:
            blocks.setdefault((cmd.where.split(":")[0], cmd.block), []).append(cmd)
    return list(blocks.values())


def _run_block(block: list[DocCommand], directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_corpus(directory)
    monkeypatch.chdir(directory)
    for cmd in block:
        try:
            rc = main(list(cmd.argv))
        except SystemExit as e:  # --help exits through argparse
            rc = e.code or 0
        assert rc == 0, f"{cmd.where}: 'lmforge {' '.join(cmd.argv)}' exited with {rc}"


FAST_BLOCKS = _runnable_blocks("fast")
SLOW_BLOCKS = _runnable_blocks("slow")


@pytest.mark.parametrize("block", FAST_BLOCKS, ids=[b[0].where for b in FAST_BLOCKS])
def test_doc_block_runs(block: list[DocCommand], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _run_block(block, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("block", SLOW_BLOCKS, ids=[b[0].where for b in SLOW_BLOCKS])
def test_slow_doc_block_runs(block: list[DocCommand], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _run_block(block, tmp_path, monkeypatch)


def test_some_blocks_run():
    assert FAST_BLOCKS and SLOW_BLOCKS, "no <!-- docs-test: run --> blocks: the docs would only be parsed"


# ----------------------------------------------------------------------------------------------
# links and size


LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_relative_links_resolve(path: Path):
    text = path.read_text(encoding="utf-8")
    broken = [m["target"] for m in LINK.finditer(text)
              if "://" not in m["target"] and not (path.parent / m["target"]).exists()]
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


def test_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES, "the README is a landing page; move reference to docs/"
    unlinked = [p.name for p in DOC_FILES[1:] if f"docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "scripts/test.sh" in ci and "./scripts/test.sh" in readme and "./scripts/quickstart.sh" in readme


# ----------------------------------------------------------------------------------------------
# the checker itself can fail


def _planted(tmp_path: Path, body: str) -> list[DocCommand]:
    doc = tmp_path / "planted.md"
    doc.write_text(f"# planted\n\n```bash\n{body}\n```\n", encoding="utf-8")
    return doc_commands(doc)


def test_a_bad_flag_is_reported_with_file_and_line(tmp_path: Path):
    cmds = _planted(tmp_path, "lmforge tokenizer train --input a.jsonl \\\n    --vocab_sise 512   # typo")
    assert [c.where for c in cmds] == ["planted.md:4"]
    error = check_command(cmds[0])
    assert error is not None and error.startswith("planted.md:4:") and "--vocab_sise" in error
    assert "--vocab_size" in error  # the parser's suggestion comes through


def test_an_unknown_command_and_a_missing_recipe_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    cmds = _planted(tmp_path, "lmforge pretrian --train.lr 1\nlmforge pretrain recipes/missing.toml")
    errors = [check_command(c) for c in cmds]
    assert errors[0] is not None and "planted.md:4: unknown command" in errors[0]
    assert errors[1] is not None and "planted.md:5:" in errors[1] and "recipe not found" in errors[1]


def test_commands_are_found_the_way_the_shell_splits_them(tmp_path: Path):
    body = "\n".join([
        "cd runs && .venv/bin/lmforge report runs/x   # comment --not-a-flag",
        "printf 'hi\\n/quit\\n' | lmforge chat --checkpoint M",
        "torchrun --nproc-per-node 2 -m lmforge pretrain recipes/pretrain-tiny.toml --parallel.data fsdp",
        "OMP_NUM_THREADS=1 ./scripts/quickstart.sh --fresh",
        "pip install -e '.[serve]'",
    ])
    assert [c.argv for c in _planted(tmp_path, body)] == [
        ("report", "runs/x"),
        ("chat", "--checkpoint", "M"),
        ("pretrain", "recipes/pretrain-tiny.toml", "--parallel.data", "fsdp"),
        ("quickstart", "--fresh"),
    ]


def test_inline_commands_are_checked_too(tmp_path: Path):
    doc = tmp_path / "inline.md"
    doc.write_text("Run `lmforge convert` or `lmforge eval --checkpoint M --limt 5`; `lmforge <command> --help`.\n")
    cmds = doc_commands(doc)
    assert [c.argv for c in cmds] == [("convert",), ("eval", "--checkpoint", "M", "--limt", "5")]
    assert check_command(cmds[0]) is None
    assert check_command(DocCommand("x.md:1", ("eval", "--limit", "5"), "", 0, inline=True)) is None
    error = check_command(cmds[1])
    assert error is not None and error.startswith("inline.md:1:") and "--limit" in error


def test_console_blocks_and_run_marks(tmp_path: Path):
    doc = tmp_path / "c.md"
    doc.write_text("<!-- docs-test: run slow -->\n```console\n$ lmforge report R\nlmforge output line\n```\n"
                   "```python\nlmforge = 1\n```\n", encoding="utf-8")
    assert [(c.where, c.argv, c.run) for c in doc_commands(doc)] == [("c.md:3", ("report", "R"), "slow")]


# ----------------------------------------------------------------------------------------------
# module paths and Python names the prose points at


def resolve(dotted: str) -> bool:
    """Whether `lmforge.a.b.C` names a module or an attribute of one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def stale_references(path: Path) -> list[str]:
    """`lmforge.x.y` names and repository paths in inline code (and paths in shell blocks) that do not exist."""
    stale = []
    for line in doc_lines(path):
        if line.lang is None:
            for span in CODE_SPAN.findall(line.text):
                stale += [f"{line.number}: {n}" for n in DOTTED.findall(span) if not resolve(n)]
                stale += [f"{line.number}: {p}" for p in REPO_PATH.findall(span) if not (ROOT / p).exists()]
        elif line.lang in SHELL_BLOCKS:
            code = line.text.split(" #")[0]
            stale += [f"{line.number}: {p}" for p in REPO_PATH.findall(code) if not (ROOT / p).exists()]
    return stale


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_named_modules_and_paths_exist(path: Path):
    stale = stale_references(path)
    assert not stale, f"{path.relative_to(ROOT)} names what does not exist: {stale}"


def test_a_moved_module_is_reported(tmp_path: Path):
    doc = tmp_path / "moved.md"
    doc.write_text("Loss: `lmforge.train.losses.dpo_loss` in `lmforge/train/checkpoint.py`, ok: `lmforge.cli.main`\n")
    doc.write_text(doc.read_text() + "```bash\npython benchmarks/gone.py --x 1   # benchmarks/also_gone.py\n```\n")
    assert stale_references(doc) == ["1: lmforge.train.losses.dpo_loss", "1: lmforge/train/checkpoint.py",
                                     "3: benchmarks/gone.py"]
