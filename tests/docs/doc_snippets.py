"""Find the code blocks of the project's Markdown files, and the directives that steer their execution.

Every ```python block of README.md and docs/**/*.md is run by tests/docs/test_snippets.py.
The blocks of one file run in order, in one namespace (a throwaway module), so a later block may
use what an earlier block of the same file defined -- never anything the test defines.

A block can be steered by an HTML comment on the line before its opening fence (blank lines
between are allowed), which renders as nothing:

    <!-- snippet: skip (why it cannot run) -->   not run; counted and reported as skipped
    <!-- snippet: cwd /tmp/fmt-example -->       run with this working directory
    <!-- snippet: argv a.ckpt b -->              run with sys.argv = [<file>, "a.ckpt", "b"]
    <!-- snippet: fresh /tmp/fmt-example -->     remove this directory (under the temp dir) first

Several directives go in one comment separated by ";".  Anything else after "snippet:" is an
error, so a misspelt directive cannot silently skip a block.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*snippet\s*:(?P<body>.*?)-->\s*$")
_SKIP = re.compile(r"^skip\s*\((?P<reason>.+)\)$")
#: Buckets named by s3:// and gs:// URLs in snippets (the test creates each one on its server).
BUCKET_URL = re.compile(r"\b(?P<scheme>s3|gs)://(?P<bucket>[a-z0-9][a-z0-9._-]{1,61}[a-z0-9])(?=[/\"'\s]|$)")


class DirectiveError(ValueError):
    """A ``<!-- snippet: ... -->`` comment this runner does not understand."""


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    path: Path                 # the Markdown file
    line: int                  # 1-based line of the first line of code (after the opening fence)
    lang: str                  # the info string's first word, lower-case ("" if none)
    code: str                  # the block's text, indentation of the fence removed
    skip: str | None = None    # reason, if marked skip
    cwd: str | None = None
    argv: list[str] | None = None
    fresh: list[str] = field(default_factory=list)
    directive_line: int | None = None

    @property
    def rel(self) -> str:
        try:
            return self.path.relative_to(REPO).as_posix()
        except ValueError:
            return str(self.path)

    @property
    def where(self) -> str:
        """``file:line`` of the first line of code, for test ids and messages."""
        return f"{self.rel}:{self.line}"

    @property
    def is_python(self) -> bool:
        return self.lang in PYTHON_LANGS

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS


def markdown_files(root: Path = REPO) -> list[Path]:
    """README.md and every Markdown file under docs/, in a stable order."""
    files = [root / "README.md"] if (root / "README.md").exists() else []
    docs = root / "docs"
    if docs.is_dir():
        files += sorted(p for p in docs.rglob("*.md") if p.is_file())
    return files


def _split_directives(body: str) -> list[str]:
    """Split on ";" outside parentheses (a skip reason may contain ";")."""
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == ";" and depth <= 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in parts + [current]]


def _apply_directive(block: Block, body: str, where: str) -> None:
    for part in _split_directives(body):
        if not part:
            continue
        word, _, rest = part.partition(" ")
        rest = rest.strip()
        if word == "skip":
            match = _SKIP.match(part)
            if not match or not match.group("reason").strip():
                raise DirectiveError(f"{where}: write a skip as `<!-- snippet: skip (reason) -->`, got {part!r}")
            block.skip = match.group("reason").strip()
        elif word == "cwd" and rest:
            block.cwd = rest
        elif word == "argv":
            block.argv = shlex.split(rest)
        elif word == "fresh" and rest:
            target = Path(rest)
            temp = Path(tempfile.gettempdir()).resolve()
            if not target.is_absolute() or temp not in target.resolve().parents:
                raise DirectiveError(f"{where}: `fresh` only removes directories under {temp}, got {rest!r}")
            block.fresh.append(rest)
        else:
            raise DirectiveError(
                f"{where}: unknown snippet directive {part!r}; use skip (reason), cwd PATH, argv ARGS or fresh PATH"
            )


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced code block of ``path``, in order, with its directives applied."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match.group("indent"), match.group("fence")
        info = match.group("info").strip()
        lang = info.split()[0].lower().strip("{}.") if info else ""
        start = i + 1
        end = start
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[start:end]]
        block = Block(path, start + 1, lang, "\n".join(body) + "\n")
        # The directive: the nearest non-blank line above the fence, if it is a snippet comment.
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0:
            directive = _DIRECTIVE.match(lines[j])
            if directive:
                block.directive_line = j + 1
                _apply_directive(block, directive.group("body").strip(), f"{path}:{j + 1}")
        blocks.append(block)
        i = end + 1
    return blocks


def python_blocks(files: list[Path] | None = None) -> list[Block]:
    """The ```python blocks of every documentation file, file by file, in order."""
    return [b for f in (files if files is not None else markdown_files()) for b in parse_blocks(f) if b.is_python]


def buckets_named(blocks: list[Block]) -> dict[str, set[str]]:
    """``{"s3": {...}, "gs": {...}}``: the buckets the runnable blocks name in URLs."""
    found: dict[str, set[str]] = {"s3": set(), "gs": set()}
    for block in blocks:
        if block.skip is None:
            for match in BUCKET_URL.finditer(block.code):
                found[match.group("scheme")].add(match.group("bucket"))
    return found


def cli_invocations(block: Block) -> list[list[str]]:
    """The ``cloudckpt ...`` command lines of a shell block, as argument lists (line continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", block.code)
    commands = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        line = line.split(" #", 1)[0]
        for segment in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
            try:
                words = shlex.split(segment)
            except ValueError:
                continue
            # Allow "VAR=value cloudckpt ..." prefixes.
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words = words[1:]
            if words and words[0] == "cloudckpt":
                commands.append(words[1:])
    return commands


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower-case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors of the headings of a Markdown file (outside code blocks), with GitHub's -1, -2 suffixes."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link that is not an absolute URL, outside code blocks."""
    links = []
    in_code = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for match in _LINK.finditer(line):
            target = match.group("target")
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                links.append((number, target))
    return links
