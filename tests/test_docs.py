"""The docs cannot drift from the code.

- Every relative link and image in README.md and docs/*.md resolves: the file exists, and a `#anchor`
  names a heading of its page (GitHub's slug).
- Every `--flag` given to one of our programs is one its argparse parser accepts. Commands are read from
  the pages' fenced shell blocks and from inline code that starts like a command; each program's parser is
  its own `build_parser()`, so nothing runs. Inline code that is not a command (a flag named in prose)
  must hold flags of one of our parsers or of torchrun, or of the few other programs listed below.
A made-up page shows that each check can fail.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _module_parser(module: str):
    return lambda: importlib.import_module(module).build_parser()


def _file_parser(relative: str):
    def build():
        path = ROOT / relative
        sys.path.insert(0, str(path.parent))  # tools/gpu/*.py import their neighbours
        try:
            spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        return module.build_parser()
    return build


def _no_flags():
    return argparse.ArgumentParser()


DRIVER = _module_parser("lns_megatron.config")
FINETUNE = _module_parser("lns_megatron.hf.finetune")
# A program as the docs name it -> the parsers whose flags it accepts (launchers pass extra flags on).
PROGRAMS = {
    "lns_megatron.pretrain": [DRIVER], "lns-pretrain": [DRIVER],
    "examples/pretrain_gpt_lns.sh": [DRIVER], "examples/pretrain_gpt_lns.slurm": [DRIVER],
    "examples/ab_norm_schemes.sh": [DRIVER], "examples/ab_pre_vs_lns.sh": [DRIVER],
    "examples/ab_cpu_study.sh": [DRIVER], "examples/sparsity_cpu_study.sh": [DRIVER],
    "examples/growth_cpu_study.sh": [DRIVER],
    "tools/grow_depth.py": [_module_parser("lns_megatron.training.growth")],
    "lns_megatron.finetune": [FINETUNE], "tools/finetune_hf.py": [FINETUNE],
    "examples/finetune_lns_deepspeed.sh": [FINETUNE],
    "tools/preprocess_data.py": [_module_parser("lns_megatron.data.preprocess")],
    "tools/merge_datasets.py": [_module_parser("lns_megatron.data.merge")],
    "tools/export_hf.py": [_module_parser("lns_megatron.hf.export")],
    "tools/depth_report.py": [_module_parser("lns_megatron.diagnostics.report")],
    "tools/ab_summary.py": [_module_parser("lns_megatron.diagnostics.ab")],
    "tools/gpu/run_checks.sh": [_file_parser("tools/gpu/checks.py")],
    "tools/gpu/prepare_kit.sh": [_no_flags], "tools/gpu/stage.sh": [_no_flags],
    "examples/preprocess_slurm_array.sh": [_no_flags],
    "examples/prepare_docs_corpus.py": [_file_parser("examples/prepare_docs_corpus.py")],
    "benchmarks/bench_norm_scheme.py": [_file_parser("benchmarks/bench_norm_scheme.py"), DRIVER],
    "benchmarks/bench_preprocess.py": [_file_parser("benchmarks/bench_preprocess.py")],
}
# Flags the pages name in prose for programs that are not ours (Megatron-LM's, pip's), the `--no-` prefix
# and the placeholder `--flag`.
OTHER_FLAGS = {"--flag", "--spec", "--legacy-tokenizer", "--exit-signal-handler", "--no-", "--index-url", "--no-deps",
               "--no-index", "--target"}
OUR_PREFIXES = ("examples/", "tools/", "benchmarks/", "lns_megatron.")
SEPARATORS = {"&&", "||", ";", "|", "(", ")", "do", "then", "else", "done", "fi"}


@lru_cache(maxsize=None)
def flags_of(program: str) -> frozenset:
    if program == "torchrun":
        from torch.distributed.run import get_args_parser
        parsers = [get_args_parser()]
    else:
        parsers = [build() for build in PROGRAMS[program]]
    return frozenset(flag for p in parsers for flag in p._option_string_actions if flag.startswith("--"))


@lru_cache(maxsize=None)
def all_known_flags() -> frozenset:
    return frozenset().union(*(flags_of(p) for p in PROGRAMS), flags_of("torchrun"), OTHER_FLAGS)


def flag_name(token: str):
    """`--flag`, `--flag=value`, `[--flag`, `--a/-b` -> `--flag`; anything else -> None."""
    m = re.match(r"\[?(--[A-Za-z0-9][A-Za-z0-9_-]*)", token)
    return m.group(1) if m else None


def commands(text: str):
    """The simple commands of a shell snippet, as token lists: `\\` continuations joined, comments dropped,
    split at line ends, pipes, `&&`, `;` and loop keywords."""
    for line in text.replace("\\\n", " ").split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:  # an apostrophe in prose-like inline code: words are enough
            tokens = line.split()
        current = []
        for token in tokens:
            if token in SEPARATORS:
                if current:
                    yield current
                current = []
            else:
                current.append(token)
        if current:
            yield current


def program_and_args(tokens):
    """(program, its arguments, torchrun's own flags) of a command; program None for a shell builtin."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]  # environment assignments
    if not tokens:
        return None, [], []
    head, rest = tokens[0], tokens[1:]
    if head in ("python", "python3", "$PYTHON"):
        if rest[:2] == ["-m", "torch.distributed.run"]:
            return program_and_args(["torchrun"] + rest[2:])
        if rest[:1] == ["-m"] and len(rest) > 1:
            return rest[1], rest[2:], []
        return (rest[0], rest[1:], []) if rest and not rest[0].startswith("-") else (None, [], [])
    if head in ("bash", "sh", "sbatch", "exec"):
        return (rest[0], rest[1:], []) if rest else (None, [], [])
    if head == "torchrun":
        from torch.distributed.run import get_args_parser
        actions, launcher, i = get_args_parser()._option_string_actions, [], 0
        while i < len(rest):
            token = rest[i]
            if token == "-m":
                return (rest[i + 1] if i + 1 < len(rest) else None), rest[i + 2:], launcher
            if not token.startswith("-"):
                return token, rest[i + 1:], launcher
            launcher.append(token)
            action = actions.get(token.split("=")[0])
            i += 1 if "=" in token or action is None or action.nargs == 0 else 2
        return None, [], launcher
    return head, rest, []


def command_problems(tokens, where: str):
    program, args, launcher = program_and_args(tokens)
    problems = [f"{where}: torchrun does not accept {f}" for f in map(flag_name, launcher)
                if f and f not in flags_of("torchrun")]
    if program is None:
        return problems
    program = program.removeprefix("./")
    if program not in PROGRAMS:
        if program.startswith(OUR_PREFIXES):
            problems.append(f"{where}: {program} is ours but tests/test_docs.py knows no parser for it (add it to PROGRAMS)")
        return problems  # another program (pip, pytest, Megatron-LM's pretrain_gpt.py, ...)
    for token in args:
        flag = flag_name(token)
        if flag and flag not in flags_of(program):
            problems.append(f"{where}: {program} does not accept {flag}")
    return problems


def _starts_like_a_command(span: str) -> bool:
    """Inline code with flags such as `python tools/x.py --a` or `tensorboard --logdir d` (checked as a
    command; other programs' are skipped), not `--flag value` or `--a --b` (flags named in prose), nor a
    name alone (`tools/gpu/`)."""
    tokens = span.split()
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]
    return (bool(tokens) and not tokens[0].startswith(("-", "[-"))
            and any(token.startswith(("--", "[--")) for token in tokens))


def _blocks_and_prose(text: str):
    """(fenced blocks as (language, body, first line)), prose lines as (line number, line)."""
    blocks, prose, fence, body, start = [], [], None, [], 0
    for n, line in enumerate(text.split("\n"), 1):
        if line.startswith("```"):
            if fence is None:
                fence, body, start = line[3:].strip(), [], n
            else:
                blocks.append((fence, "\n".join(body), start))
                fence = None
        elif fence is None:
            prose.append((n, line))
        else:
            body.append(line)
    return blocks, prose


def flag_problems(page: Path):
    blocks, prose = _blocks_and_prose(page.read_text())
    problems = []
    for language, body, start in blocks:
        if language not in ("bash", "sh", "shell"):
            continue
        for tokens in commands(body):
            where = f"{page.name}:{start}"
            if tokens[0].startswith("--"):  # a block of flags alone (a recipe): flags of one of our programs
                problems += [f"{where}: no program of ours accepts {f}" for f in map(flag_name, tokens)
                             if f and f not in all_known_flags()]
            else:
                problems += command_problems(tokens, where)
    for n, line in prose:
        for span in re.findall(r"`([^`]+)`", line):
            where = f"{page.name}:{n}"
            if _starts_like_a_command(span):
                for tokens in commands(span.replace("\\|", "|")):
                    problems += command_problems(tokens, where)
            else:
                problems += [f"{where}: no program of ours accepts {f} (`{span}`)"
                             for f in map(flag_name, re.split(r"[\s/|\\]+", span)) if f and f not in all_known_flags()]
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lowercased, punctuation but `-` and `_` removed,
    spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    _, prose = _blocks_and_prose(page.read_text())
    seen, found = {}, set()
    for _, line in prose:
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            base = slug(m.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_problems(page: Path):
    _, prose = _blocks_and_prose(page.read_text())
    problems = []
    for n, line in prose:
        line = re.sub(r"`[^`]*`", "", line)
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                problems.append(f"{page.name}:{n}: {target}: no such file")
            elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
                problems.append(f"{page.name}:{n}: {target}: no heading #{anchor} in {file.name}")
    return problems


def test_every_relative_link_and_image_resolves():
    assert len(PAGES) > 5, "README.md and docs/*.md"
    problems = [p for page in PAGES for p in link_problems(page)]
    assert not problems, "\n".join(problems)


def test_every_flag_the_pages_name_is_accepted_by_its_program():
    problems = [p for page in PAGES for p in flag_problems(page)]
    assert not problems, "\n".join(problems)


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_the_checks_fail_on_a_made_up_page(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    (tmp_path / "real.png").write_bytes(b"\x89PNG")
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "# Made up",
        "[fine](other.md#a-section) [fine too](#made-up) ![fine](real.png) [web](https://example.com)",
        "[gone](missing.md) ![gone](missing.png) [bad anchor](other.md#no-such-section)",
        "```bash",
        "python -m lns_megatron.pretrain --preset tiny --train-iters=5 --no-such-flag 3",
        "NNODES=2 bash examples/pretrain_gpt_lns.sh --lr 1e-3 \\",
        "    --made-up-flag && python tools/merge_datasets.py --input a --output-prefix b --nope",
        "torchrun --nproc_per_node 2 --not-torchruns -m lns_megatron.pretrain --mock-data",
        "python tools/not_a_known_tool.py --x",
        "pip install --whatever -e .   # not ours: not checked",
        "--lr 1e-3 --not-a-recipe-flag",
        "```",
        "Prose: `--check-for-nan-in-loss-and-grad` is not a flag; `--no-check-for-nan-in-loss-and-grad` is; "
        "`python tools/export_hf.py --load X --wrong`.",
    ]) + "\n")
    links = link_problems(page)
    assert len(links) == 3, links
    assert any("missing.md" in p for p in links) and any("missing.png" in p for p in links)
    assert any("#no-such-section" in p for p in links)
    flags = flag_problems(page)
    expected = ["lns_megatron.pretrain does not accept --no-such-flag",
                "examples/pretrain_gpt_lns.sh does not accept --made-up-flag",
                "tools/merge_datasets.py does not accept --nope",
                "torchrun does not accept --not-torchruns",
                "tools/not_a_known_tool.py is ours but tests/test_docs.py knows no parser",
                "no program of ours accepts --not-a-recipe-flag",
                "no program of ours accepts --check-for-nan-in-loss-and-grad",
                "tools/export_hf.py does not accept --wrong"]
    for e in expected:
        assert any(e in p for p in flags), (e, flags)
    assert len(flags) == len(expected), flags


def test_slugs_match_github():
    assert slug("Other norm schemes: Peri-LN, Post-LN, Mix-LN, DeepNorm, DyT, BHyT (`--norm-scheme NAME`)") == \
        "other-norm-schemes-peri-ln-post-ln-mix-ln-deepnorm-dyt-bhyt---norm-scheme-name"
    assert slug("tools/preprocess_data.py against Megatron-LM's") == "toolspreprocess_datapy-against-megatron-lms"
    assert slug("LNS on `HybridModel` (megatron-core 0.19 and later)") == "lns-on-hybridmodel-megatron-core-019-and-later"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_program_parser_builds(program):
    assert flags_of(program) or PROGRAMS[program] == [_no_flags]
