"""The documentation's examples, run as written (README.md and docs/*.md).

- Every ```python block runs. The blocks of one page run in order, in one
  namespace, in this process: the page's code is written to one file whose
  line numbers are the page's own (everything else blank), so a traceback
  points at the Markdown line, and TorchScript and inspect can read the source.
- A ```python block after `<!-- run-with: torchrun --nproc-per-node N -->` is a
  complete program for torchrun, run on its own on N local processes.
- A ```python block after `<!-- not-run: reason -->` is skipped (use sparingly:
  a signature or fragment belongs in a ```text block or inline code).
- Every fence names its language; every `make` target a ```bash block names is
  in the Makefile; every repository path a page names exists; every relative
  link and its #anchor resolve.

The README's C++ program is built and run by tests/test_cpp.py.
"""
from __future__ import annotations

import glob
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

from conftest import ROOT, subprocess_env

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "text", "cpp", "cmake"}
FENCE = re.compile(r"^\s*```(\S*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*(not-run|run-with):\s*(.*?)\s*-->$")
TORCHRUN = re.compile(r"^torchrun --nproc-per-node (\d+)$")


class Block(NamedTuple):
    page: Path
    line: int             # 1-based line of the block's first code line
    lang: str
    code: str
    directive: Optional[tuple[str, str]]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        d = DIRECTIVE.match(prev)
        start = i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{page.relative_to(ROOT)}:{i + 1}: unclosed code block"
        blocks.append(Block(page, start + 1, m.group(1), "\n".join(lines[start:end]) + "\n",
                            (d.group(1), d.group(2)) if d else None))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in _blocks(page)]


def _in_process(block: Block) -> bool:
    return block.lang == "python" and block.directive is None


def test_pages_exist_and_readme_stays_short():
    names = {p.name for p in PAGES}
    assert {"README.md", "index.md", "how-it-works.md", "performance.md", "cpp.md", "distributed.md",
            "gpu.md", "development.md"} <= names, names
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_every_block_is_labelled_and_every_directive_known(block):
    assert block.lang in LANGUAGES, f"{block.where}: fence language {block.lang!r}, not one of {sorted(LANGUAGES)}"
    if block.directive is None:
        return
    assert block.lang == "python", f"{block.where}: a directive on a {block.lang} block"
    kind, arg = block.directive
    if kind == "not-run":
        assert arg, f"{block.where}: `not-run` needs a reason"
    else:
        assert TORCHRUN.match(arg), f"{block.where}: run-with {arg!r} (expected 'torchrun --nproc-per-node N')"


def _page_file(page: Path, tmp_path: Path) -> Optional[Path]:
    """The page's in-process Python blocks at their own line numbers, all else blank."""
    blocks = [b for b in BLOCKS if b.page == page and _in_process(b)]
    if not blocks:
        return None
    lines = [""] * len(page.read_text().splitlines())
    for b in blocks:
        for k, text in enumerate(b.code.splitlines()):
            lines[b.line - 1 + k] = text
    path = tmp_path / f"{page.name}.py"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.page == p and _in_process(b) for b in BLOCKS)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(page, tmp_path):
    path = _page_file(page, tmp_path)
    try:
        runpy.run_path(str(path), run_name=f"__docs_{page.stem.replace('-', '_')}__")
    except BaseException as exc:
        tb = exc.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == str(path):
                line = tb.tb_lineno
            tb = tb.tb_next
        pytest.fail(f"{page.relative_to(ROOT)}:{line}: the example raised {type(exc).__name__}: {exc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN_BLOCKS = [b for b in BLOCKS if b.directive and b.directive[0] == "run-with"]


@pytest.mark.slow
@pytest.mark.parametrize("block", TORCHRUN_BLOCKS, ids=lambda b: b.where)
def test_torchrun_programs_run(block, tmp_path):
    nproc = TORCHRUN.match(block.directive[1]).group(1)
    program = tmp_path / "program.py"
    program.write_text(block.code)
    # torchrun is `python -m torch.distributed.run`; the port through torchrun's own environment
    # variable, so that parallel runs do not collide
    # In a session of its own: a hung run is killed with its workers (torchrun's
    # children), which would otherwise outlive the test holding their ports.
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc, str(program)],
                            cwd=ROOT, env=subprocess_env(PET_MASTER_PORT=_free_port()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{block.where}: the program did not finish in 180 s\n{stderr[-4000:]}\n{stdout[-2000:]}")
    assert proc.returncode == 0, f"{block.where}: the program failed\n{stderr[-4000:]}\n{stdout[-2000:]}"


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for line in re.findall(r"^([\w .-]+):(?!=)", text, re.M) for t in line.split()}


def test_make_targets_exist():
    targets = _makefile_targets()
    named = {(b.where, t) for b in BLOCKS if b.lang == "bash"
             for t in re.findall(r"(?:^|[;&|(]\s*)make ([\w-]+)", b.code, re.M)}
    for page in PAGES:  # inline `make x` too
        for t in re.findall(r"`make ([\w-]+)`", page.read_text()):
            named.add((str(page.relative_to(ROOT)), t))
    assert named, "no make target found in the docs"
    missing = sorted((where, t) for where, t in named if t not in targets)
    assert not missing, missing


# A path inside this repository: starts at one of its top-level folders, not in the middle of another path
# (`<pgext/pgext.h>` is an include, `/opt/pgext` not ours).
REPO_PATH = re.compile(r"(?<![\w/<.$-])((?:benchmarks|cmake|csrc|docs|examples|pgext|requirements|tests|\.ci)"
                       r"/[\w./{},*<>-]*)")


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[:m.start()] + alt + path[m.end():])]


def test_named_paths_exist():
    missing = []
    for page in PAGES:
        for m in REPO_PATH.finditer(page.read_text()):
            raw = m.group(1).rstrip(".,:)")
            for path in _expand(raw):
                pattern = re.sub(r"<[^<>]*>", "*", path)
                if not glob.glob(str(ROOT / pattern)):
                    missing.append(f"{page.relative_to(ROOT)}: {raw}")
    assert not missing, missing


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^\s*```.*?^\s*```\s*$", "", page.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_resolve():
    bad = []
    for page in PAGES:
        text = re.sub(r"^\s*```.*?^\s*```\s*$", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, bad


def test_no_lab_notebook_history():
    """The git log holds the history; the pages say what is, on what it was measured."""
    found = []
    for page in PAGES:
        for pat in (r"\bcommit [0-9a-f]{7,40}\b", r"\bbefore this change\b", r"\bat commit\b"):
            found += [f"{page.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pat, page.read_text(), re.I)]
    assert not found, found
