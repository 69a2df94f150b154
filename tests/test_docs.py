"""What users read is true: the docs' examples run as written, links stay in the repository,
and messages print durations without float noise.

Every fenced ``python`` block of README.md and docs/**/*.md runs as its own script, in a
fresh folder holding a fresh SQLite store that ``MLFLOW_TRACKING_URI`` names, with only this
repository on ``PYTHONPATH`` (users have the repository, nothing next to it). A block whose
first line is ``# name.py`` is that file: it is also written into the folder of every block
of its page, so a later block may import it, as a reader who saved it would. Two HTML
comments, on the line(s) just before a block, change what happens to it:

* ``<!-- docs-test: fragment -->``: not a program (a signature, a shape); not run.
* ``<!-- docs-test: requires MODULE ... -->``: skipped when a module is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from stores import SqliteLock

from client import PendingRunId, QueueingClient

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCK_TIMEOUT = 600.0  # seconds; a hung example fails instead of hanging the suite

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`]*)$")
_MARK = re.compile(r"<!--\s*docs-test:\s*(?P<mark>.*?)\s*-->")
_FILE_NAME = re.compile(r"^#\s*(?P<name>\w+\.py)\s*$")
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    """One fenced ``python`` block of a page."""

    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    marks: tuple[str, ...]

    @property
    def file_name(self) -> str | None:
        first = self.code.splitlines()[0] if self.code else ""
        match = _FILE_NAME.match(first)
        return match.group("name") if match else None

    @property
    def fragment(self) -> bool:
        return "fragment" in self.marks

    @property
    def requires(self) -> list[str]:
        return [
            module
            for mark in self.marks
            if mark.startswith("requires ")
            for module in mark.split()[1:]
        ]

    @property
    def label(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The page's fenced ``python`` blocks (dedented), each with the marks just before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    marks: list[str] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            mark = _MARK.search(lines[i])
            if mark is not None:
                marks.append(mark.group("mark"))
            elif lines[i].strip():
                marks = []  # a mark belongs to the block right after it
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if fence.group("info").strip() == "python":
            code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
            blocks.append(Block(page, i + 1, code, tuple(marks)))
        marks = []
        i = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def test_the_docs_have_examples_and_few_fragments() -> None:
    """Guards the extraction itself: a broken parser would make every other test vacuous."""
    pages = {block.page for block in ALL_BLOCKS}
    assert REPO / "README.md" in pages
    assert REPO / "docs" / "guides" / "autologging.md" in pages
    fragments = [block.label for block in ALL_BLOCKS if block.fragment]
    assert len(fragments) <= 3, f"too many examples that do not run: {fragments}"
    for block in ALL_BLOCKS:
        for mark in block.marks:
            assert mark == "fragment" or mark.startswith("requires "), (block.label, mark)


@pytest.fixture
def page_folder(tmp_path: Path, template_db: Path) -> Path:
    """A folder with a fresh, migrated ./mlflow.db, as a reader's project folder."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return tmp_path


def _environment(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *inherited])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if not b.fragment], ids=lambda b: b.label)
def test_example_runs_as_written(block: Block, page_folder: Path) -> None:
    for module in block.requires:
        pytest.importorskip(module)
    for other in python_blocks(block.page):
        if other.file_name is not None:
            (page_folder / other.file_name).write_text(other.code, encoding="utf-8")
    script = block.file_name or "example.py"
    (page_folder / script).write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, script],
        cwd=page_folder,
        env=_environment(page_folder),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    assert done.returncode == 0, (
        f"{block.label} exited with {done.returncode}\n"
        f"--- stdout (end)\n{done.stdout[-3000:]}\n--- stderr (end)\n{done.stderr[-6000:]}"
    )


@pytest.mark.slow
def test_the_service_example_runs_again_in_the_same_folder(page_folder: Path) -> None:
    """A reader runs an example more than once: the second run finds what the first made
    (its experiment, say) instead of failing on it."""
    (block,) = [
        b for b in python_blocks(REPO / "docs" / "operations.md") if "flush_interval=" in b.code
    ]
    (page_folder / "service.py").write_text(block.code, encoding="utf-8")
    for attempt in (1, 2):
        done = subprocess.run(
            [sys.executable, "service.py"],
            cwd=page_folder,
            env=_environment(page_folder),
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
        assert done.returncode == 0, (attempt, done.stderr[-3000:])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_inside_the_repository(page: Path) -> None:
    """Users have the repository only: a relative link must name one of its files."""
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text
    for match in _LINK.finditer(text):
        target = match.group("target")
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"{page.name} links outside the repository: {target}"
        assert path.exists(), f"{page.name} links to a missing file: {target}"


# -- durations in messages ------------------------------------------------------------------

_NOISY_SECONDS = re.compile(r"\d+\.\d{3,}\s*s\b")


def test_resolve_timeout_message_rounds_the_duration() -> None:
    with pytest.raises(TimeoutError) as caught:
        PendingRunId().resolve(timeout=0.2000001)
    assert "within 0.2 s" in str(caught.value)
    assert not _NOISY_SECONDS.search(str(caught.value)), str(caught.value)


@pytest.fixture
def locked_store(lock_store: Callable[..., SqliteLock]) -> Iterator[SqliteLock]:
    """The test's SQLite store, locked by a second connection (``BEGIN EXCLUSIVE``) until
    the test ends: every write of every process waits, then fails as "database is locked"."""
    with lock_store() as lock:
        yield lock


def test_flush_and_close_timeout_messages_round_the_duration(
    tracking_uri: str, experiment_id: str, executor: str, locked_store: SqliteLock
) -> None:
    client = QueueingClient(tracking_uri, executor=executor, retry_timeout=1.0)
    run = client.create_run(experiment_id, run_name="locked-out")
    client.log_metrics(run, {"loss": 1.0})
    operations = client.flush(synchronous=False)
    with pytest.raises(TimeoutError) as waited:
        operations.await_completion(timeout=0.3000001)
    assert "within 0.3 s" in str(waited.value)
    # close() names the caller's bound, not what was left of it when its wait began.
    with pytest.raises(MlflowException) as closed:
        client.close(timeout=0.5000001)
    assert "close waits at most 0.5 s" in closed.value.message
    for text in (str(waited.value), closed.value.message):
        assert not _NOISY_SECONDS.search(text), text


_EXIT_SCRIPT = """
import sys
from client import QueueingClient

client = QueueingClient(sys.argv[1], retry_timeout=1.0)
run = client.create_run(sys.argv[2])
client.log_metrics(run, {"loss": 1.0})
# no close(): the exit handler flushes, and gives up after RUNACTORS_EXIT_TIMEOUT seconds
"""


@pytest.mark.slow
def test_exit_messages_round_the_duration(
    tracking_uri: str, experiment_id: str, locked_store: SqliteLock, tmp_path: Path
) -> None:
    script = tmp_path / "exits.py"
    script.write_text(_EXIT_SCRIPT, encoding="utf-8")
    env = _environment(tmp_path)
    env["RUNACTORS_EXIT_TIMEOUT"] = "1.0000001"
    done = subprocess.run(
        [sys.executable, str(script), tracking_uri, experiment_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not _NOISY_SECONDS.search(done.stderr), done.stderr[-3000:]
    # The bound is what was left of RUNACTORS_EXIT_TIMEOUT for this client: 1 s or just under.
    bound = re.search(
        r"closing before the last flush completed: .* waits at most (\S+) s", done.stderr
    )
    assert bound is not None, done.stderr[-3000:]
    assert 0.5 <= float(bound.group(1)) <= 1.0
