"""Running an external command to its end: the one runner every part uses
for tools such as qemu-img, resize2fs, nft and ip.

Commands are argv lists, never shell strings. A run is logged, bounded by a
timeout, and its child is killed if the timeout or anything else (an
exception, a cancelled task) ends the wait early, so no tool outlives the
call that started it. A failure is a CommandError(cmd, rc, out, err); a tool
that is not installed is a MissingCommand, which is both a NotFound (what a
user is told) and a CommandError with rc 127 (what a shell would say).

Long-lived children (guests, daemons) are not run here: they are tracked by
soda.hypervisors.process and the drivers that start them."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from typing import Sequence

from soda.errors import CommandError, NotFound

log = logging.getLogger(__name__)


class MissingCommand(CommandError, NotFound):
    """The command's program is not installed (or not on PATH)."""

    def __init__(self, cmd: Sequence[str], hint: str = ""):
        super().__init__(cmd, 127, err=f"{cmd[0]} is missing")
        self.message = f"{cmd[0]} is missing" + (f" ({hint})" if hint else "")


def run(argv: Sequence[str], *, timeout: float, stdin: str | None = None, ok: tuple[int, ...] = (0,),
        hint: str = "") -> str:
    """Run argv, feed it `stdin`, return its stdout (text). CommandError when
    it exits with a code not in `ok` or outlives `timeout` seconds;
    MissingCommand (with `hint`: where to get it) when argv[0] is missing."""
    argv = list(argv)
    log.debug("running %s", " ".join(argv))
    try:
        # subprocess.run kills the child on a timeout and on any exception
        # that interrupts the wait, and reaps it before returning.
        r = subprocess.run(argv, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                           capture_output=True, text=True, errors="replace", timeout=timeout)
    except FileNotFoundError:
        raise MissingCommand(argv, hint) from None
    except subprocess.TimeoutExpired:
        raise CommandError(argv, -1, err=f"timed out after {timeout:g} s") from None
    except OSError as exc:
        raise CommandError(argv, 126, err=f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if r.returncode not in ok:
        raise CommandError(argv, r.returncode, r.stdout, r.stderr)
    return r.stdout


async def run_async(argv: Sequence[str], *, timeout: float, stdin: str | None = None,
                    ok: tuple[int, ...] = (0,), hint: str = "") -> str:
    """`run` for an asyncio loop: the same errors, and the child is killed
    when the task is cancelled as well as on a timeout."""
    argv = list(argv)
    log.debug("running %s", " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise MissingCommand(argv, hint) from None
    except OSError as exc:
        raise CommandError(argv, 126, err=f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except BaseException as exc:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        if isinstance(exc, TimeoutError):
            raise CommandError(argv, -1, err=f"timed out after {timeout:g} s") from None
        raise
    if proc.returncode not in ok:
        raise CommandError(argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    return out.decode(errors="replace")
