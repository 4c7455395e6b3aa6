"""The documentation: the site builds with every link and anchor resolved, the README's links resolve, every
`ablation` command the README and docs/ quote still parses with the real parser, and the reference pages list
every key the code has (config, profile, sweep spec, run-folder files)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from ablation import cli, config, rundir, sweepdir

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# Markdown outside docs/ whose links must resolve on GitHub: the README and the pointers beside the code.
OUTSIDE = [README, ROOT / "slurm" / "README.md"]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def doc_pages() -> list[Path]:
    """Every Markdown file under docs/ (pages and fragments alike)."""
    return sorted(DOCS.rglob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as CI and a maintainer build it: `mkdocs build --strict` (mkdocs.yml turns broken links,
    missing anchors and pages left out of the nav into warnings, and strict turns warnings into a failure)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor, on every build
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed (install '.[dev]' or '.[docs]'):\n{proc.stdout}{proc.stderr}"
    return out


def built_page(site: Path, md: Path) -> Path:
    """The HTML file mkdocs writes for docs/<md> (directory URLs; README.md and index.md are their folder's index)."""
    rel = md.relative_to(DOCS)
    return site / (rel.parent if rel.name in ("index.md", "README.md") else rel.with_suffix("")) / "index.html"


def test_the_site_builds_strictly_with_every_page(site: Path) -> None:
    nav = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)["nav"]

    def pages(items) -> Iterator[str]:
        for item in items:
            value = next(iter(item.values())) if isinstance(item, Mapping) else item
            yield from (pages(value) if isinstance(value, list) else [value])

    listed = list(pages(nav))
    assert {"index.md", "norms.md", "profiles.md", "sweep-spec.md", "run-folder.md", "reliability.md"} <= set(listed)
    for page in listed:
        assert built_page(site, DOCS / page).is_file(), page


@pytest.mark.parametrize("md", OUTSIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_outside_the_site_resolve(md: Path, site: Path) -> None:
    """The README's (and slurm/README.md's) relative links name files that exist, and their anchors headings that
    exist (checked in the built page: the ids mkdocs gives headings, which GitHub's match for plain-word headings)."""
    bad = []
    for target in LINK.findall(md.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (md.parent / path).resolve() if path else md
        if not file.exists():
            bad.append(f"{target}: no {file}")
        elif anchor:
            assert file.suffix == ".md" and DOCS in file.parents, f"{target}: anchors are checked in docs/ pages only"
            if f'id="{anchor}"' not in built_page(site, file).read_text():
                bad.append(f"{target}: no heading '#{anchor}' in {file.relative_to(ROOT)}")
    assert not bad, f"{md.relative_to(ROOT)}: broken links: {bad}"


# --------------------------------------------------------------------------- quoted commands


def _commands(line: str) -> Iterator[list[str]]:
    """The argv after `ablation` of each ablation command on a shell line (`ablation ...`, `python3 -m ablation ...`,
    `torchrun ... -m ablation ...`, after `X=Y` assignments and `&&`), with `...` (an elided rest) left out."""
    lex = shlex.shlex(line, posix=True, punctuation_chars="&|;")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:  # not shell (an unbalanced quote in prose)
        return
    command: list[str] = []
    for tok in [*tokens, ";"]:
        if tok and set(tok) <= set("&|;"):
            while command and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", command[0]):
                command.pop(0)
            if command[:1] == ["ablation"]:
                yield [t for t in command[1:] if t != "..."]
            elif command[:1] in (["python"], ["python3"], ["torchrun"]) and "-m" in command:
                i = command.index("-m")
                if command[i + 1:i + 2] == ["ablation"]:
                    yield [t for t in command[i + 2:] if t != "..."]
            command = []
        else:
            command.append(tok)


def quoted_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every ablation command in a fenced code block of the README or a docs/ page."""
    found = []
    for md in [README, *doc_pages()]:
        for block in FENCE.findall(md.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                for argv in _commands(line):
                    found.append((f"{md.relative_to(ROOT)}: {line.strip()}", argv))
    return found


def _check_config_items(items: list[str]) -> None:
    """[CONFIG.yaml] [key=value ...]: the file (if the repository has it) and every override, as `ablation train` reads them."""
    path, overrides = cli._split_config_args(items)
    config.load(ROOT / path if path and (ROOT / path).is_file() else None, overrides)


def test_every_quoted_command_parses_with_the_real_parser() -> None:
    """A command renamed, an option renamed or removed, a config key renamed, a preset or profile of the repository
    that no longer loads: each fails here. Paths the reader makes (data/, results/, mycluster.yaml) are only parsed."""
    from ablation.sweep import spec as sweepmod
    from ablation.sweep.cluster import load_profile

    commands = quoted_commands()
    assert len(commands) >= 30 and {argv[0] for _, argv in commands} >= {"demo", "sweep", "status", "report", "train", "probe"}
    bad = []
    for where, argv in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = cli.build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code:
                bad.append(f"{where}\n    {err.getvalue().strip().splitlines()[-1]}")
            continue
        try:
            if args.command in ("train", "config", "probe") or getattr(args, "data_command", None) == "bench":
                _check_config_items(args.items)
            if args.command == "sweep":
                if args.spec and (ROOT / args.spec).is_file():
                    sweepmod.load(ROOT / args.spec, args.overrides)
                else:
                    config.load(None, args.overrides)
                if args.profile and (ROOT / args.profile).is_file():
                    load_profile(ROOT / args.profile, args.executor)
        except Exception as e:  # noqa: BLE001 - any failure to read what the docs quote is the finding
            bad.append(f"{where}\n    {type(e).__name__}: {e}")
    assert not bad, "quoted commands that no longer parse:\n" + "\n".join(bad)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def test_every_command_in_prose_names_real_options() -> None:
    """`ablation <command> ... --option` in running text: the command exists and has each option named."""
    parser = cli.build_parser()
    bad, seen = [], 0
    for md in [README, *doc_pages()]:
        prose = FENCE.sub("", md.read_text())
        for span in re.findall(r"`((?:ablation|python3? -m ablation) [^`]*)`", prose):
            words = [w.strip("[]") for w in span.split()]
            words = words[words.index("ablation") + 1:]
            if words and words[0].startswith("<"):  # `ablation <command> --help`
                continue
            p = parser
            while words and words[0] in _subparsers(p):
                p = _subparsers(p)[words.pop(0)]
            options = {o for a in p._actions for o in a.option_strings}
            for word in words:
                if word.startswith("--") and word.split("=")[0] not in options:
                    bad.append(f"{md.relative_to(ROOT)}: `{span}`: {p.prog} has no {word.split('=')[0]}")
            seen += 1
    assert seen >= 20 and not bad, bad


def test_each_commands_help_renders() -> None:
    """`ablation <command> --help` for every command, as a reader would look an option up."""
    parser = cli.build_parser()
    todo = [([], parser)]
    while todo:
        prefix, p = todo.pop()
        for name, sub in _subparsers(p).items():
            todo.append(([*prefix, name], sub))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            parser.parse_args([*prefix, "--help"])
        assert exit_.value.code == 0 and "usage: ablation" in out.getvalue()


# --------------------------------------------------------------------------- what the commands point to


def test_the_norms_command_points_to_sections_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["norms"]) == 0
    pointers = re.findall(r"(docs/[\w./-]+\.md), '([^']+)'", capsys.readouterr().out)
    assert len(pointers) >= 2 and ("docs/norms.md", "Your own norm") in pointers
    for page, section in pointers:
        headings = re.findall(r"^#+\s+(.+?)\s*$", (ROOT / page).read_text(), re.M)
        assert section in headings, f"`ablation norms` points to {page}, '{section}': no such heading ({headings})"


def test_status_of_a_wrong_folder_names_the_demos_sweep_folder(tmp_path: Path) -> None:
    """`ablation status demo` (the demo's --out, not its sweep folder) says which folder to pass; the docs say it too."""
    from ablation.errors import AblationError
    from ablation.sweep import spec as sweepmod

    out = cli.build_parser().parse_args(["demo"]).out
    sweep_folder = f"{out}/results/{sweepmod.load(ROOT / 'sweeps' / 'demo.yaml').name}"
    assert sweep_folder == "demo/results/demo"
    with pytest.raises(AblationError, match=re.escape(sweep_folder)):
        sweepdir.load_manifest(tmp_path / "demo")
    quick = f"{out}/results/{sweepmod.load(ROOT / 'sweeps' / 'demo_quick.yaml').name}"
    for md in (README, DOCS / "demo.md"):
        assert f"ablation status {sweep_folder}" in md.read_text() and quick in md.read_text(), md


# --------------------------------------------------------------------------- the reference pages are complete


def _table_rows(md: Path) -> dict[str, list[str]]:
    """The rows of a page's tables by their first cell's `code` name: {key: [cells after it]}."""
    rows = {}
    for line in md.read_text().splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m[1]] = [c.strip() for c in re.split(r"(?<!\\)\|", m[2])]
    return rows


def test_the_config_page_lists_every_key_with_its_default() -> None:
    rows = _table_rows(DOCS / "config.md")
    keys = [key for key, _, _ in config.field_help()]
    assert not [k for k in keys if k not in rows], "docs/config.md lacks config keys"
    for key, _, default in config.field_help():
        shown = yaml.safe_load(rows[key][0].strip("`"))
        expected = list(default) if isinstance(default, tuple) else default
        assert shown == pytest.approx(expected, abs=1e-3) if isinstance(expected, (list, float)) else shown == expected, key


def test_the_profiles_page_lists_every_key_with_its_default() -> None:
    from ablation.sweep.cluster import Profile

    rows = _table_rows(DOCS / "profiles.md")
    for f in dataclasses.fields(Profile):
        assert f.name in rows, f"docs/profiles.md lacks the profile key {f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        expected = list(default) if isinstance(default, tuple) else dict(default) if isinstance(default, Mapping) else default
        assert yaml.safe_load(rows[f.name][1].strip("`")) == expected, f"docs/profiles.md: default of {f.name}"


def test_the_sweep_spec_page_documents_every_key_and_its_example_expands() -> None:
    from ablation.sweep import spec as sweepmod

    text = (DOCS / "sweep-spec.md").read_text()
    rows = _table_rows(DOCS / "sweep-spec.md")
    assert [k for k in sweepmod.SPEC_KEYS if k not in rows] == []
    assert all(f"`{k}`" in text for k in (*sweepmod.BLOCK_KEYS, *sweepmod.CONDITION_KEYS))
    example = re.search(r"```yaml\n(.*?)```", text, re.S)[1]
    assert len(sweepmod.expand(yaml.safe_load(example)).runs) > 1


def test_the_run_folder_page_names_every_file() -> None:
    text = (DOCS / "run-folder.md").read_text()
    constants = [(k, v) for m in (rundir, sweepdir) for k, v in vars(m).items() if k.isupper() and isinstance(v, str)]
    names = [v for _, v in constants if re.fullmatch(r"\.?[\w.]+", v)]
    assert {"final.json", "manifest.json", "constraints.txt"} <= set(names)
    assert [n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}\b", text)] == []


def test_the_demo_page_shows_the_published_table() -> None:
    rows = [line for line in (DOCS / "demo_table.md").read_text().splitlines() if line.startswith("| ")]
    assert rows and all(row in (DOCS / "demo.md").read_text() for row in rows), "regenerate docs/demo.md's table from docs/demo_table.md"


def test_the_readme_is_a_quickstart() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 120, f"README.md has {len(lines)} lines: move the detail into docs/"
    for page in ("sweep-spec.md", "profiles.md", "norms.md", "run-folder.md", "recipe.md", "data.md", "reliability.md", "internals.md"):
        assert f"(docs/{page}" in README.read_text(), page


CITED = re.compile(r"(?<![\w/.<$-])((?:ablation|benchmarks|sweeps|slurm|docs|notebooks|tests|\.ci)/[\w./-]*\w)")
# Paths the docs cite that are not in the repository by design: a user's copy of the profile template, a placeholder.
NOT_IN_THE_REPOSITORY = {"slurm/profiles/mycluster.yaml", "sweeps/x.yaml"}


def test_every_file_the_docs_cite_exists_or_is_said_not_to() -> None:
    """A path in the README or docs/ is a file of the repository, or the page says it is not there yet (the GPU benchmark's
    records, written on a GPU owner's machine): no page sends a reader to a file that does not exist."""
    missing = []
    for page in [*OUTSIDE, *doc_pages()]:
        text = page.read_text()
        for path in sorted({m.group(1) for m in CITED.finditer(text)}):
            if (ROOT / path).exists() or path in NOT_IN_THE_REPOSITORY:
                continue
            if path == "benchmarks/results/gpu.jsonl" and re.search(r"not (exist )?in the repository", text):
                continue
            missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert missing == []
