"""The launcher gives up root before it execs the VMM, so that root in a
guest is not root on the host: read from /proc of the exec'd program
itself, not from the launcher's word."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("dropping to another uid needs root", allow_module_level=True)

from soda.hypervisors.recorded import LAUNCHER  # noqa: E402

# What the exec'd program reports about itself.
REPORT = ("id -u; id -g; id -G; ulimit -n; ulimit -Hn; umask; "
          "grep -E '^(CapEff|CapPrm|CapInh|CapAmb|NoNewPrivs):' /proc/self/status")


def launch(*options, argv=("/bin/sh", "-c", REPORT), **kw):
    return subprocess.run([sys.executable, "-I", "-S", LAUNCHER, *options, "--", *argv],
                          capture_output=True, text=True, timeout=30, **kw)


def test_the_vmm_runs_as_the_uid_with_no_capabilities_no_new_privs_and_the_file_limit():
    r = launch("--nofile", "123", "--user", "201007")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:6] == ["201007", "201007", "201007", "123", "123", "0077"]
    status = dict(line.split(":\t") for line in lines[6:])
    assert status == {"CapInh": "0000000000000000", "CapPrm": "0000000000000000",
                      "CapEff": "0000000000000000", "CapAmb": "0000000000000000",
                      "NoNewPrivs": "1"}


def test_a_setuid_program_gains_nothing_after_the_drop():
    # no_new_privs: a setuid-root binary runs with the caller's uid. In a
    # dir of its own the uid can reach (pytest's tmp dirs are 0700).
    top = tempfile.mkdtemp(prefix="soda-launch-test-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        program = os.path.join(top, "suid-id")
        shutil.copy("/usr/bin/id", program)
        os.chmod(program, 0o4755)
        r = launch("--user", "201008", argv=(program, "-u"))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "201008"
    finally:
        shutil.rmtree(top)


def test_the_log_is_opened_as_root_before_the_drop(tmp_path):
    log = tmp_path / "console.log"           # in a dir the uid cannot enter
    os.chmod(tmp_path, 0o700)
    r = launch("--log", str(log), "--user", "201009", argv=("/bin/sh", "-c", "id -u; ls /root"))
    assert r.returncode != 0                 # the program ran as the uid: /root is closed to it
    text = log.read_text()
    assert text.splitlines()[0] == "201009" and "Permission denied" in text
    assert os.stat(log).st_uid == 0


def test_a_vmm_the_uid_cannot_execute_fails_with_one_line(tmp_path):
    os.chmod(tmp_path, 0o700)
    program = tmp_path / "vmm"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o700)
    r = launch("--user", "201010", argv=(str(program),))
    assert r.returncode == 127
    assert r.stderr.strip() == f"soda-launch: cannot execute {program}: Permission denied"
