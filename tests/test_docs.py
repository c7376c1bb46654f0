"""The README and docs/ say only what is true of the code: links resolve, named flags exist, every setting
and every module is documented, and the README stays a short way in (issue 26). Fast: no Ray is started.

Each check is a function over the text of a page that returns the problems it finds (file and line), so
`test_the_checks_catch_mistakes` can prove on made-up pages that every check fails when it should.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 250


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def where(path: Path, line: int) -> str:
    try:
        return f"{path.relative_to(REPO)}:{line}"
    except ValueError:
        return f"{path}:{line}"


# --- reading a page --------------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")
SPAN = re.compile(r"(`+)(.+?)\1")


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each logical line inside fenced code blocks; a line ending in a backslash
    continues on the next, as the shell reads it."""
    lines, inside, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            pending = ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each line outside fenced code blocks."""
    lines, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            lines.append((number, line))
    return lines


def code_spans(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span outside code blocks. A span may wrap onto the next
    line of a paragraph, so lines are joined in pairs when a backtick is left open."""
    spans, carry, carry_line = [], "", 0
    for number, line in prose(text):
        joined = f"{carry} {line}" if carry else line
        if joined.count("`") % 2 and not carry:
            carry, carry_line = line, number
            continue
        spans += [(carry_line if carry else number, match.group(2)) for match in SPAN.finditer(joined)]
        carry = ""
    return spans


# --- links -----------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, counts = set(), {}
    for _, line in prose(path.read_text()):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def link_problems(path: Path, text: str) -> list[str]:
    """Relative links and images that lead nowhere (a missing file, or a missing heading in a page)."""
    problems = []
    for number, line in prose(text):
        for match in LINK.finditer(SPAN.sub("", line)):
            target = match.group(1)
            if target.startswith(EXTERNAL):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                problems.append(f"{where(path, number)}: link to {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where(path, number)}: link to {target}: no heading #{anchor} in {resolved.name}")
    return problems


# --- command flags ---------------------------------------------------------------------------------------------

COMMAND = re.compile(r"(?:^|(?<=[\s/(`]))(?:xray-ray\s+([a-z][\w-]*)|python\s+jobs/(tune|score)\.py)(?=\s|$)(.*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
SHELL_END = re.compile(r"\s(?:\||&&|;|>>?|#)\s|\s[|;]")


def cli_flags() -> dict[str, set[str]]:
    """Each `xray-ray` command's options, as its `--help` lists them (the Typer app's own click command)."""
    import typer

    from xray_ray.cli import app

    group = typer.main.get_command(app)
    return {name: {flag for param in command.params if not getattr(param, "hidden", False)
                   for flag in [*param.opts, *param.secondary_opts] if flag.startswith("--")} | {"--help"}
            for name, command in group.commands.items()}


def command_uses(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, command, flags) for every `xray-ray CMD ...` or `python jobs/CMD.py ...` in code."""
    uses = []
    for number, code in [*code_blocks(text), *code_spans(text)]:
        for match in COMMAND.finditer(code):
            command = match.group(1) or match.group(2)
            rest = SHELL_END.split(match.group(3))[0]
            rest = COMMAND.split(rest)[0]  # a second command on the line is its own use
            uses.append((number, command, FLAG.findall(rest)))
    return uses


def flag_problems(path: Path, text: str, flags: dict[str, set[str]]) -> list[str]:
    """Flags named for a command that the command does not have; bare `--flag` spans that no command has."""
    problems = []
    for number, command, named in command_uses(text):
        if command not in flags:
            problems.append(f"{where(path, number)}: `xray-ray {command}` is not a command")
            continue
        problems += [f"{where(path, number)}: `xray-ray {command}` has no {flag}"
                     for flag in named if flag not in flags[command]]
    every = set().union(*flags.values())
    for number, span in code_spans(text):
        bare = re.fullmatch(r"(--[a-z][\w-]*)(?:[ =].*)?", span.strip())
        if bare and bare.group(1) not in every:
            problems.append(f"{where(path, number)}: no xray-ray command has {bare.group(1)}")
    return problems


# --- settings and layout ---------------------------------------------------------------------------------------

def setting_problems(text: str, keys) -> list[str]:
    return [f"docs/configuration.md does not document `{key}`" for key in keys if f"`{key}`" not in text]


def rendered(value) -> str:
    """A default as the configuration page writes it: YAML-like words, lists in brackets."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(rendered(item) for item in value) + "]"
    return str(value)


def default_problems(text: str, defaults: dict) -> list[str]:
    """Settings without a row `| `section.key` | default | ... |`, and rows whose default is not the field's."""
    problems, rows = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        row = re.match(r"\|\s*`([a-z0-9_]+\.[a-z0-9_]+)`\s*\|\s*([^|]*?)\s*\|", line)
        if row:
            rows.add(row.group(1))
        if row and row.group(1) in defaults and row.group(2) != rendered(defaults[row.group(1)]):
            problems.append(f"docs/configuration.md:{number}: `{row.group(1)}` default is "
                            f"{rendered(defaults[row.group(1)])}, the page says {row.group(2)}")
    return problems + [f"docs/configuration.md has no table row for `{key}`" for key in defaults if key not in rows]


def layout_problems(text: str, modules) -> list[str]:
    """Modules missing from the README's layout, and modules it names that do not exist."""
    named = set(re.findall(r"`(xray_ray/[\w/]+\.py)`", text))
    return ([f"README.md's layout does not list {module}" for module in sorted(set(modules) - named)]
            + [f"README.md names {module}, which does not exist" for module in sorted(named - set(modules))])


def modules() -> list[str]:
    return sorted(str(path.relative_to(REPO)) for path in (REPO / "xray_ray").rglob("*.py"))


# --- the tests -------------------------------------------------------------------------------------------------

def test_every_relative_link_and_image_resolves():
    problems = [problem for page in pages() for problem in link_problems(page, page.read_text())]
    assert not problems, "\n".join(problems)


def test_the_readme_links_every_docs_page_and_its_picture():
    text = README.read_text()
    unlinked = [page.name for page in sorted(DOCS.glob("*.md")) if f"(docs/{page.name})" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"
    assert "(docs/scoring_report.png)" in text and (DOCS / "scoring_report.png").stat().st_size > 10_000


def test_every_flag_named_for_a_command_exists():
    flags = cli_flags()
    uses = [use for page in pages() for use in command_uses(page.read_text())]
    assert len({command for _, command, _ in uses}) >= 9, "the docs name every command at least once"
    problems = [problem for page in pages() for problem in flag_problems(page, page.read_text(), flags)]
    assert not problems, "\n".join(problems)


def length_problems(text: str) -> list[str]:
    lines = len(text.splitlines())
    return [f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"] \
        if lines > README_MAX_LINES else []


def test_the_readme_is_short():
    problems = length_problems(README.read_text())
    assert not problems, problems[0]


def test_every_setting_is_documented_with_its_default():
    from xray_ray.config import Config, flat_config

    keys = list(flat_config(Config()))
    assert len(keys) > 40
    text = (DOCS / "configuration.md").read_text()
    problems = setting_problems(text, keys) + default_problems(text, flat_config(Config()))
    assert not problems, "\n".join(problems)


def test_the_readme_layout_lists_every_module():
    problems = layout_problems(README.read_text(), modules())
    assert not problems, "\n".join(problems)


def test_the_checks_catch_mistakes(tmp_path):
    """Each check, on a made-up page with one mistake of its kind, reports it with the file and line."""
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    text = ("Intro [ok](there.md) and [ok too](there.md#a-heading) and [web](https://example.org/x).\n"
            "![missing picture](nowhere.png)\n"
            "[bad anchor](there.md#no-such-heading)\n"
            "```\n"
            "[inside code](ignored.md)\n"
            "xray-ray score --archive /a \\\n"
            "    --model m --out o --no-such-flag\n"
            "```\n"
            "Run `xray-ray serve --model M --port 1` or `python jobs/tune.py --config c --bogus`.\n"
            "Also `xray-ray frobnicate --x` and `--batch-wait-ms` alone.\n")
    page.write_text(text)

    links = link_problems(page, text)
    assert [problem.split(": ")[0] for problem in links] == [f"{page}:2", f"{page}:3"], links
    assert "nowhere.png" in links[0] and "#no-such-heading" in links[1]

    flags = {"score": {"--archive", "--model", "--out"}, "serve": {"--model", "--port"},
             "tune": {"--config"}, "demo": set()}
    found = flag_problems(page, text, flags)
    assert any(f"{page}:6" in p and "--no-such-flag" in p for p in found), found
    assert any(f"{page}:9" in p and "--bogus" in p for p in found), found
    assert any(f"{page}:10" in p and "frobnicate" in p for p in found), found
    assert any(f"{page}:10" in p and "--batch-wait-ms" in p for p in found), found
    assert len(found) == 4, found

    assert setting_problems("`data.seed` only", ["data.seed", "data.split"]) == [
        "docs/configuration.md does not document `data.split`"]
    assert default_problems("| `data.seed` | 123 | x |\n| `data.split` | [0.8, 0.1, 0.1] | y |",
                            {"data.seed": 123, "data.split": (0.9, 0.05, 0.05)}) == [
        "docs/configuration.md:2: `data.split` default is [0.9, 0.05, 0.05], the page says [0.8, 0.1, 0.1]"]
    assert layout_problems("`xray_ray/a.py` and `xray_ray/gone.py`", ["xray_ray/a.py", "xray_ray/new.py"]) == [
        "README.md's layout does not list xray_ray/new.py", "README.md names xray_ray/gone.py, which does not exist"]

    assert length_problems("line\n" * (README_MAX_LINES + 1)) and not length_problems("line\n" * README_MAX_LINES)


@pytest.mark.parametrize("heading, anchor", [
    ("bench_score.py", "bench_scorepy"), ("Metrics (Prometheus)", "metrics-prometheus"),
    ("Why `compact` and not EfficientNetB1", "why-compact-and-not-efficientnetb1"),
    ("Paths, outputs and resuming", "paths-outputs-and-resuming")])
def test_anchors_follow_githubs_rule(heading, anchor):
    assert slug(heading) == anchor
