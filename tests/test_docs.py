"""The documentation runs: every command block of README.md and docs/*.md is run on tiny data (or says why
it cannot be), every option it shows exists, every link and repository path resolves, the README stays
short, and ``mkdocs build --strict`` passes.

The runnable-block convention (docs/contributing.md, "Commands in the docs"): each fenced ``bash`` or
``python`` block is preceded by an HTML comment, invisible on the rendered page, that says what this test
does with it:

    <!-- test: run -->                      run it
    <!-- test: run | OLD => NEW | ... -->   run it with these text replacements (smaller settings; ``{port}``
                                            in NEW is a port that was free when the page started)
    <!-- test: run exit=2 -->               run it; every cddrec command in it must exit with 2
    <!-- test: by tests/test_x.py::name --> run by that test (which must exist)
    <!-- test: skip REASON -->              not runnable here (a GPU, a Ray cluster, a package install)

A ``bash``/``python`` block without a marker fails ``test_every_command_block_is_marked``. Blocks of a page
run in order in one scratch folder that holds ``../shared/data/Office_Products.txt`` (a tiny synthetic file
in the format of the paper's; written with ``cddrec.synthetic``). README.md runs first; the docs pages start
from the files its walk left (``office.pt``, ``office.onnx``, ``requests.jsonl``, ...), as a reader would.

Lines that call a ``cddrec-*`` console script (no pipes or redirections) run in this process through the
script's own entry point (a fresh interpreter would pay torch's import for every line); anything else runs
in ``bash``. Python blocks run in this process. A line that ends in ``&`` starts a background job (a server)
whose output goes to ``.jobN.log``; ``kill %N`` stops job N with SIGTERM and expects it to exit 0
(``kill -HUP %N`` only sends the signal); a job that dies on its own fails the page, and every job left
is stopped when the page ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 150

MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<kind>run|by|skip)\b(?P<rest>.*?)-->\s*$")
FENCE_OPEN = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)")
COMMAND_LANGS = ("bash", "sh", "shell", "python")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "<<", "2>", "2>&1", "(", ")"}
# flags of programs other than cddrec that the docs show
EXTERNAL_FLAGS = {"--no-deps", "--head", "--port", "--address", "--model-repository", "--strict", "-q", "-e",
                  "-w", "-k", "--quiet", "--target", "--no-build-isolation", "--index-url",
                  # torchrun's
                  "--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--max-restarts",
                  "--no-python", "--standalone", "--node-rank", "--master-addr", "--master-port",
                  # benchmarks/gpu_check.sh's
                  "--prepare", "--dry-run", "--install-only"}
REPO_TOP = ("cddrec/", "export/", "runtime/", "benchmarks/", "tests/", "tools/", "docs/", ".ci/")
BACKGROUND = re.compile(r"^(?P<cmd>.*[^&\s])\s*&\s*$")  # a line ending in a lone '&'
KILL_JOB = re.compile(r"^\s*kill\s+(?:-(?P<sig>[A-Z0-9]+)\s+)?%(?P<job>\d+)\s*$")
LINE_TIMEOUT = 300  # seconds a foreground line may take


# ------------------------------------------------------------------------------------------ parsing
@dataclass
class Block:
    page: Path
    line: int  # of the opening fence
    lang: str
    code: str
    kind: str | None = None  # run | by | skip, None without a marker
    rest: str = ""  # the marker's text after its kind

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def subs(self) -> list[tuple[str, str]]:
        parts = [p.strip() for p in self.rest.split("|")[1:]]
        out = []
        for p in parts:
            old, sep, new = p.partition("=>")
            assert sep, f"{self}: a replacement must read 'OLD => NEW', got {p!r}"
            out.append((old.strip(), new.strip()))
        return out

    @property
    def expected_exit(self) -> int:
        m = re.search(r"\bexit=(\d+)", self.rest.split("|")[0])
        return int(m.group(1)) if m else 0

    def runnable_code(self, port: int | None = None) -> str:
        code = self.code
        for old, new in self.subs:
            assert old in code, f"{self}: the replacement {old!r} => {new!r} does not match the block"
            code = code.replace(old, new.replace("{port}", str(port)) if port is not None else new)
        return code


def blocks_of(page: Path) -> list[Block]:
    """Fenced blocks of a page (any language), each with the test marker of the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m.group("indent")), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][indent:])
            i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mk = MARKER.match(prev)
        out.append(Block(page, start + 1, m.group("lang").lower(), "\n".join(body) + "\n",
                         mk.group("kind") if mk else None, mk.group("rest").strip() if mk else ""))
        i += 1
    return out


def command_blocks(page: Path) -> list[Block]:
    return [b for b in blocks_of(page) if b.lang in COMMAND_LANGS]


def logical_lines(code: str) -> list[str]:
    """Shell lines: backslash continuations joined, a here-document kept with its command, comments dropped."""
    raw, out, i = code.splitlines(), [], 0
    while i < len(raw):
        line = raw[i]
        i += 1
        while line.rstrip().endswith("\\") and i < len(raw):
            line = line.rstrip()[:-1] + " " + raw[i].strip()
            i += 1
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:
            end = heredoc.group(1)
            while i < len(raw):
                line += "\n" + raw[i]
                i += 1
                if raw[i - 1].strip() == end:
                    break
        if line.strip() and not line.strip().startswith("#"):
            out.append(line)
    return out


def tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        return list(lex)
    except ValueError:  # an unbalanced quote: let bash judge it
        return line.split()


# ------------------------------------------------------------------------------------- the commands
def console_scripts() -> dict:
    return {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("cddrec-")}


def command_of(program: str) -> click.Command | None:
    """The click command of ``cddrec-NAME`` or ``python -m cddrec.benchmarks.NAME`` / ``-m cddrec.app.NAME``."""
    scripts = console_scripts()
    if program in scripts:
        return scripts[program].load()
    if program.startswith(("cddrec.benchmarks.", "cddrec.app.")):
        return getattr(import_module(program), "main", None)
    return None


def subcommand(cmd: click.Command, args: list[str]) -> tuple[click.Command, list[str]]:
    """A group's subcommand named by the first argument, with the rest of the arguments."""
    if isinstance(cmd, click.Group) and args and args[0] in cmd.commands:
        return cmd.commands[args[0]], args[1:]
    return cmd, args


def option_names(cmd: click.Command, hidden: bool = False) -> set[str]:
    """Every spelling of ``cmd``'s options shown in --help (``hidden``: the old spellings too; a group's
    subcommands' too)."""
    names = {"--help", "-h"}
    for sub in getattr(cmd, "commands", {}).values():
        names |= option_names(sub, hidden)
    for p in cmd.params:
        if isinstance(p, click.Option):
            if p.hidden and not hidden:
                continue
            aliases = set(getattr(p, "hidden_aliases", ()))
            names |= {o for o in p.opts + p.secondary_opts if hidden or o not in aliases}
    return names


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(program, its arguments) of each cddrec command of a shell line, up to the next shell operator."""
    toks, out = tokens(line), []
    for i, t in enumerate(toks):
        prog = None
        if t in console_scripts():
            prog, args = t, toks[i + 1:]
        elif t == "-m" and i + 1 < len(toks) and toks[i + 1].startswith(("cddrec.benchmarks.", "cddrec.app.")):
            prog, args = toks[i + 1], toks[i + 2:]
        if prog:
            end = next((j for j, a in enumerate(args) if a in SHELL_OPERATORS), len(args))
            out.append((prog, args[:end]))
    return out


# ------------------------------------------------------------------------------------------ running
@contextlib.contextmanager
def working_dir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@dataclass
class Job:
    """A background command of a page (``cmd &``): a server the following lines talk to."""

    number: int
    line: str
    proc: subprocess.Popen
    log: Path
    stopped: bool = False

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@dataclass
class Session:
    """One page's scratch folder, shell variables and background jobs."""

    cwd: Path
    env: dict = field(default_factory=dict)
    log: list = field(default_factory=list)
    jobs: list = field(default_factory=list)
    _port: int | None = None

    @property
    def port(self) -> int:
        """A TCP port that was free when first asked for (the page's server listens there)."""
        if self._port is None:
            from cddrec.benchmarks.ports import free_port

            self._port = free_port()
        return self._port

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.env.get(m.group(1), m.group(0)), text)

    def shell_env(self) -> dict:
        """The environment of bash lines: this interpreter's scripts first on PATH (the console scripts)."""
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, "PATH": path, **self.env}

    def run_block(self, block: Block) -> None:
        code = block.runnable_code(self.port if "{port}" in block.rest else None)
        if block.lang == "python":
            with working_dir(self.cwd):
                exec(compile(code, str(block), "exec"), {"__name__": "__main__"})  # noqa: S102 - the docs' own code
            self.check_jobs(block)
            return
        for line in logical_lines(code):
            self.run_line(block, line)

    def run_line(self, block: Block, line: str) -> None:
        assign = re.fullmatch(r"\s*([A-Za-z_]\w*)=(\S*)\s*", line)
        if assign:
            self.env[assign.group(1)] = self.expand(shlex.split(assign.group(2) or "''")[0])
            return
        background, kill = BACKGROUND.match(line), KILL_JOB.match(line)
        if background and "<<" not in line:
            self.start_job(line, background.group("cmd"))
            return
        if kill:
            self.kill_job(block, int(kill.group("job")), kill.group("sig") or "TERM")
            return
        toks = tokens(self.expand(line))
        expected = block.expected_exit if invocations(line) else 0  # exit=N applies to the cddrec commands
        if toks and toks[0] in console_scripts() and not SHELL_OPERATORS & set(toks) and "$(" not in line:
            code, output = self.in_process(toks[0], toks[1:])
        else:
            code, output = self.in_bash(block, line)
        self.log.append(f"$ {line}\n{output}")
        self.check_jobs(block)
        if code != expected:
            pytest.fail(f"{block}: `{line.strip()}` exited {code}, expected {expected}:\n{output[-3000:]}")

    def in_bash(self, block: Block, line: str) -> tuple[int, str]:
        """Run a line in bash; a background job that dies meanwhile (a server that could not start) fails it
        at once instead of after the line's timeout."""
        proc = subprocess.Popen(["bash", "-c", line], cwd=self.cwd, env=self.shell_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + LINE_TIMEOUT
        while True:
            try:
                output, _ = proc.communicate(timeout=0.5)
                return proc.returncode, output
            except subprocess.TimeoutExpired:
                dead = [j for j in self.jobs if not j.stopped and j.proc.poll() is not None]
                if dead or time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
                    self.check_jobs(block)
                    pytest.fail(f"{block}: `{line.strip()}` took over {LINE_TIMEOUT} s")

    def start_job(self, line: str, command: str) -> None:
        number = len(self.jobs) + 1
        log = self.cwd / f".job{number}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", command], cwd=self.cwd, env=self.shell_env(), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.jobs.append(Job(number, line.strip(), proc, log))
        self.log.append(f"$ {line}\n[{number}] {proc.pid}")

    def check_jobs(self, block: Block) -> None:
        for j in self.jobs:
            if not j.stopped and j.proc.poll() is not None:
                j.stopped = True
                pytest.fail(f"{block}: background job %{j.number} `{j.line}` ended by itself (exit "
                            f"{j.proc.returncode}):\n{j.output()}")

    def kill_job(self, block: Block, number: int, sig: str) -> None:
        """``kill [-SIG] %N``: SIGTERM (the default) must stop the job with exit status 0; other signals are sent."""
        if not 1 <= number <= len(self.jobs) or self.jobs[number - 1].stopped:
            pytest.fail(f"{block}: `kill %{number}`: no such running job")
        self.check_jobs(block)
        job = self.jobs[number - 1]
        signum = getattr(signal, sig if sig.startswith("SIG") else f"SIG{sig}", None) if not sig.isdigit() \
            else int(sig)
        assert signum is not None, f"{block}: unknown signal {sig}"
        os.killpg(job.proc.pid, signum)
        self.log.append(f"$ kill -{sig} %{number}")
        if signum not in (signal.SIGTERM, signal.SIGINT):
            return
        try:
            code = job.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()
            code = "none within 60 s"
        job.stopped = True
        if code != 0:
            pytest.fail(f"{block}: `{job.line}` did not stop cleanly on SIG{sig} (exit {code}):\n{job.output()}")

    def stop_jobs(self) -> None:
        """Stop every job still running (a page that failed half-way): SIGTERM, then SIGKILL."""
        for j in self.jobs:
            if j.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(j.proc.pid, signal.SIGTERM)
                try:
                    j.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(j.proc.pid, signal.SIGKILL)
                    j.proc.wait()
            j.stopped = True

    def in_process(self, program: str, args: list[str]) -> tuple[int, str]:
        """Run a console script through its entry point here, restoring what a command may change
        (signal handlers, torch's thread count, the working directory)."""
        import torch

        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        threads = torch.get_num_threads()
        try:
            with working_dir(self.cwd):
                res = CliRunner().invoke(console_scripts()[program].load(), args, prog_name=program, env=self.env)
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
            torch.set_num_threads(threads)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        return res.exit_code, res.output


def write_fixture_data(root: Path) -> None:
    """``root/shared/data/Office_Products.txt``: tiny synthetic sequences in the format of the paper's file."""
    from cddrec.synthetic import make_synthetic, write_sequence_file

    data = root / "shared" / "data"
    data.mkdir(parents=True)
    path = data / "Office_Products.txt"
    write_sequence_file(make_synthetic(num_users=200, num_items=60, num_clusters=6, min_len=5, max_len=16, seed=0),
                        path)
    # the item keys the pages' examples use (781, 1083, 215: items of the real file) are items here too
    named = [781, 1083, 215]
    keys = named + [k for k in range(64) if k not in named]
    lines = [line.split() for line in path.read_text().splitlines()]
    path.write_text("".join(" ".join([u] + [str(keys[int(i)]) for i in items]) + "\n" for u, *items in lines))


def run_page(page: Path, root: Path, start_from: Path | None = None) -> Session:
    """Run the runnable blocks of ``page`` in ``root/work`` (a copy of ``start_from``'s files, if given)."""
    work = root / "work"
    if start_from is not None:
        shutil.copytree(start_from, work)
    else:
        work.mkdir(parents=True)
    session = Session(work)
    try:
        for block in command_blocks(page):
            if block.kind == "run":
                session.run_block(block)
    finally:
        session.stop_jobs()
    return session


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> Session:
    """The README's walk, run once: its folder is where every docs page starts."""
    root = tmp_path_factory.mktemp("readme")
    write_fixture_data(root)
    return run_page(README, root)


# -------------------------------------------------------------------------------------------- tests
def test_every_command_block_is_marked():
    problems = []
    for page in PAGES:
        for b in command_blocks(page):
            if b.kind is None:
                problems.append(f"{b}: a {b.lang} block without a <!-- test: run|by|skip ... --> marker")
            elif b.kind == "skip" and len(b.rest) < 8:
                problems.append(f"{b}: 'skip' needs the reason it cannot run in CI")
            elif b.kind == "by":
                target = b.rest.split()[0] if b.rest else ""
                path, _, name = target.partition("::")
                if not (REPO / path).is_file() or not re.search(rf"^def {re.escape(name)}\b",
                                                                (REPO / path).read_text(), re.M):
                    problems.append(f"{b}: 'by {target}' names no test")
            elif b.kind == "run":
                b.subs  # noqa: B018 - the replacements parse
    assert not problems, "\n".join(problems)


def test_options_in_command_blocks_exist():
    """Every --option a command block passes to a cddrec command is one its --help shows (no old spellings)."""
    problems = []
    for page in PAGES:
        for b in command_blocks(page):
            if b.lang == "python":
                continue
            for line in logical_lines(b.code):
                for prog, args in invocations(line):
                    cmd = command_of(prog)
                    if cmd is None:
                        problems.append(f"{b}: {prog} is not a cddrec command")
                        continue
                    cmd, args = subcommand(cmd, args)
                    known = option_names(cmd)
                    for a in args:
                        flag = a.split("=", 1)[0]
                        if re.fullmatch(r"--[\w-]+", flag) and flag not in known:  # not a quoted value ('--epochs 10')
                            problems.append(f"{b}: {prog} has no option {flag}")
    assert not problems, "\n".join(problems)


def _inline_code(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)  # not in fenced blocks
    return re.findall(r"`([^`\n]+)`", text)


def test_options_in_prose_exist():
    """An --option named in the text is an option of some cddrec command or benchmark script."""
    known = set(EXTERNAL_FLAGS)
    for name in console_scripts():
        known |= option_names(command_of(name), hidden=True)
    for mod in sorted((REPO / "benchmarks").glob("*.py")):
        cmd = getattr(import_module(f"cddrec.benchmarks.{mod.stem}"), "main", None)
        if isinstance(cmd, click.Command):
            known |= option_names(cmd, hidden=True)
    problems = []
    for page in PAGES:
        for span in _inline_code(page):
            for flag in re.findall(r"(?<![\w-])(--[A-Za-z0-9][A-Za-z0-9-]*)", span):
                if flag not in known:
                    problems.append(f"{page.relative_to(REPO)}: `{span}`: no command has {flag}")
    assert not problems, "\n".join(problems)


def test_repository_paths_exist():
    """Inline code that names a file of this repository (``cddrec/config.py``, ``benchmarks/results/x.md``) exists."""
    problems = []
    for page in PAGES:
        for span in _inline_code(page):
            path = span.split("::")[0].split()[0] if span.split() else ""
            if not path.startswith(REPO_TOP) or "<" in path or "NAME" in path:
                continue
            if not (list(REPO.glob(path)) if any(c in path for c in "*?[") else (REPO / path).exists()):
                problems.append(f"{page.relative_to(REPO)}: `{span}` names no file of the repository")
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+\s+(.*?)\s*$", text, re.M)}


def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{page.relative_to(REPO)}: link {target} points to no file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{page.relative_to(REPO)}: link {target}: no heading #{anchor} in {path or page.name}")
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it under {README_MAX_LINES} and move the rest to docs/"


def test_every_docs_page_is_in_the_nav():
    import yaml

    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]

    def files(entries):
        for e in entries:
            for v in (e.values() if isinstance(e, dict) else [e]):
                yield from (files(v) if isinstance(v, list) else [v])

    assert sorted(files(nav)) == sorted(p.name for p in DOCS.glob("*.md"))


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()


def test_readme_walk_runs(walk):
    for name in ("office.pt", "office.onnx", "recs.jsonl"):
        assert (walk.cwd / name).is_file(), f"the README's walk did not leave {name}\n" + "\n".join(walk.log)


@pytest.mark.parametrize("page", [p.name for p in PAGES[1:] if any(b.kind == "run" for b in command_blocks(p))])
def test_docs_page_commands_run(page, walk, tmp_path):
    shutil.copytree(walk.cwd.parent / "shared", tmp_path / "shared")
    run_page(DOCS / page, tmp_path, start_from=walk.cwd)
