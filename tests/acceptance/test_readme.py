"""The README's quickstart runs as printed, and what its concepts say of names and streams
holds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from tests.helpers import make_trigger, open_host

if TYPE_CHECKING:
    from triggers import TriggerContext

ROOT = Path(__file__).resolve().parents[2]


def test_readme_starts_with_the_two_commands() -> None:
    """The README opens with the demo command and the test command, and .ci/run uses the latter."""
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["python3 dev.py demo", "python3 dev.py test"]
    assert readme.index("```sh") < readme.index("##"), "the commands come first"
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()


def test_readme_quickstart_runs(tmp_path: Path) -> None:
    """The quickstart enqueues, cancels and waits; it prints a cancel status and a state."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    quickstart = next(block for block in blocks if "anyio.run(main)" in block)
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0] in ("cancelled", "requested")
    assert "status=<IntentStatus.CANCELLED: 'cancelled'>" in lines[-1]
    assert list((tmp_path / "data" / "actors").rglob("*.db"))


@pytest.mark.anyio
async def test_actor_names_are_as_the_readme_says(tmp_path: Path) -> None:
    """Any non-empty string UTF-8 can encode and without NUL is a name (slashes, "..", any
    script, 1 KB); a lone surrogate, NUL or "" raise ValueError."""
    async with open_host(tmp_path, make_trigger("t")) as host:
        for name in ("team/../a", "チャット:1", "x" * 1024):
            agent = host.get(name)
            await agent.enqueue_trigger(trigger_kind="t", payload=None)
            assert (await agent.events())[0].kind == "t.requested"
        for bad in ("\udc80", "a\x00b", ""):
            with pytest.raises(ValueError, match="actor name"):
                host.get(bad)


@pytest.mark.anyio
async def test_a_retried_attempt_appends_to_the_stream(tmp_path: Path) -> None:
    """As the README's Streams says: a retry's chunks follow the failed attempt's, with no
    marker between them, and a marker written at the start of each attempt lets a reader
    keep only the last attempt's chunks."""

    async def flaky(intent: Any, ctx: TriggerContext) -> Any:
        if intent["marker"]:
            await ctx.stream.write({"attempt": ctx.attempt})
        for token in range(2):
            await ctx.stream.write(f"a{ctx.attempt}-t{token}")
        if ctx.attempt < 2:
            raise RuntimeError("flaky")
        return {}

    async with open_host(tmp_path, make_trigger("t", flaky)) as host:
        agent = host.get("chat:1")
        plain = await agent.enqueue_trigger(trigger_kind="t", payload={"marker": False})
        marked = await agent.enqueue_trigger(trigger_kind="t", payload={"marker": True})
        with anyio.fail_after(10):
            assert [c async for c in agent.stream(plain.id)] == [
                "a1-t0", "a1-t1", "a2-t0", "a2-t1",
            ]  # fmt: skip
            kept: list[Any] = []
            async for chunk in agent.stream(marked.id):
                kept = [] if isinstance(chunk, dict) and "attempt" in chunk else [*kept, chunk]
        assert kept == ["a2-t0", "a2-t1"]
