"""The one command runner: output, failures, missing tools, timeouts."""

import asyncio
import os
import time

import pytest

from soda import command
from soda.errors import CommandError, NotFound


def test_returns_stdout_and_feeds_stdin():
    assert command.run(["cat"], timeout=5, stdin="hello\n") == "hello\n"
    assert command.run(["echo", "hi"], timeout=5) == "hi\n"


def test_a_failure_carries_argv_rc_and_output():
    with pytest.raises(CommandError) as info:
        command.run(["sh", "-c", "echo out; echo bad >&2; exit 3"], timeout=5)
    assert (info.value.cmd[0], info.value.rc, info.value.out, info.value.err) == ("sh", 3, "out\n", "bad\n")
    assert "exited 3: bad" in str(info.value)


def test_exit_codes_in_ok_are_success():
    assert command.run(["sh", "-c", "exit 1"], timeout=5, ok=(0, 1)) == ""


def test_a_missing_program_is_not_found_and_rc_127():
    with pytest.raises(NotFound, match=r"^no-such-tool-here is missing \(Debian package x\)$") as info:
        command.run(["no-such-tool-here"], timeout=5, hint="Debian package x")
    assert isinstance(info.value, CommandError) and info.value.rc == 127


def test_a_timeout_kills_the_child():
    started = time.monotonic()
    with pytest.raises(CommandError, match="timed out after 0.2 s") as info:
        command.run(["sleep", "30"], timeout=0.2)
    assert info.value.rc == -1
    assert time.monotonic() - started < 5


def test_async_runner_has_the_same_contract():
    async def main():
        assert await command.run_async(["cat"], timeout=5, stdin="x") == "x"
        with pytest.raises(CommandError) as info:
            await command.run_async(["sh", "-c", "exit 2"], timeout=5)
        assert info.value.rc == 2
        with pytest.raises(NotFound):
            await command.run_async(["no-such-tool-here"], timeout=5)
        with pytest.raises(CommandError, match="timed out"):
            await command.run_async(["sleep", "30"], timeout=0.2)
    asyncio.run(main())


def test_async_runner_kills_the_child_when_cancelled(tmp_path):
    pidfile = tmp_path / "pid"

    async def main():
        task = asyncio.ensure_future(command.run_async(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"],
                                                       timeout=60))
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pidfile.read_text())

    pid = asyncio.run(main())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
