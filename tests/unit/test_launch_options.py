"""The launcher's command line: --nofile, --user and --group (the VMM's
open-files limit and the uid it drops to) and --fs-read/--fs-write (the
files it is confined to), checked before anything happens (one line,
status 2); and that a confined command really opens nothing else."""

import os
import subprocess
import sys

import pytest

from soda.hypervisors.launch import USAGE, LaunchError, landlock_abi, parse

LAUNCH = [sys.executable, "-m", "soda.hypervisors.launch"]


def test_user_nofile_and_group_are_numbers_and_group_defaults_to_the_user():
    opts = parse(["--hold", "--nofile", "256", "--user=201000", "--", "/bin/true"])
    assert (opts["nofile"], opts["user"], opts["group"]) == (256, 201000, 201000)
    assert opts["argv"] == ["/bin/true"] and opts["hold"]
    opts = parse(["--user", "201000", "--group", "201001", "--", "/bin/true"])
    assert (opts["user"], opts["group"]) == (201000, 201001)


def test_without_them_nothing_changes():
    opts = parse(["--", "/bin/true"])
    assert (opts["nofile"], opts["user"], opts["group"]) == (None, None, None)


@pytest.mark.parametrize("args, says", [
    (["--user", "0"], "--user takes a positive number, not '0'"),
    (["--user", "root"], "--user takes a positive number, not 'root'"),
    (["--user", "-5"], "--user takes a positive number"),
    (["--user", str(2 ** 32 - 1)], "--user takes a positive number"),
    (["--nofile", "0"], "--nofile takes a positive number"),
    (["--nofile", "many"], "--nofile takes a positive number"),
    (["--group", "5"], "--group needs --user"),
    (["--user"], "--user needs a value"),
    (["--fs-read", "etc"], "--fs-read takes an absolute path, not 'etc'"),
])
def test_bad_values_are_refused_with_the_usage(args, says):
    with pytest.raises(LaunchError) as caught:
        parse([*args, "--", "/bin/true"] if args != ["--user"] else args)
    assert says in str(caught.value) and str(caught.value).endswith(USAGE)


def test_a_bad_value_is_one_line_and_status_2():
    r = subprocess.run([*LAUNCH, "--user", "nobody", "--", "/bin/true"], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == "soda-launch: --user takes a positive number, not 'nobody'"


def test_fs_paths_are_collected_in_order():
    opts = parse(["--fs-read", "/a", "--fs-write=/b", "--fs-read", "/c", "--", "/bin/true"])
    assert (opts["fs_read"], opts["fs_write"]) == (["/a", "/c"], ["/b"])


def confined_sh(tmp_path, script, *fs):
    """Run `script` with /bin/sh under the launcher, confined to the shell's
    own files and `fs`."""
    libs = ["/usr", "/lib", "/lib64", "/etc/ld.so.cache", "/bin", "/dev/null"]
    args = [f"--fs-read={p}" for p in libs if os.path.exists(p)]
    return subprocess.run([*LAUNCH, *args, *fs, "--", "/bin/sh", "-c", script],
                          capture_output=True, text=True, cwd=tmp_path, timeout=30)


@pytest.mark.skipif(not landlock_abi(), reason="this kernel has no Landlock")
def test_a_confined_command_opens_only_what_it_was_given(tmp_path):
    readable, writable, other = tmp_path / "r", tmp_path / "w", tmp_path / "o"
    for d in (readable, writable, other):
        d.mkdir()
        (d / "f").write_text(d.name + "\n")
    r = confined_sh(tmp_path, f"cat {readable}/f; echo x > {writable}/new && cat {writable}/new; "
                    f"cat {other}/f; echo y > {readable}/g; ls {tmp_path}",
                    f"--fs-read={readable}", f"--fs-write={writable}")
    assert r.stdout.split() == ["r", "x"], r
    denied = [line for line in r.stderr.splitlines() if "Permission denied" in line]
    assert len(denied) == 3, r.stderr          # the other file, writing to r, listing the parent
    assert not (readable / "g").exists() and (writable / "new").read_text() == "x\n"
    # A path climbing out of an allowed dir is still the path it names.
    r = confined_sh(tmp_path, f"cat {readable}/../o/f", f"--fs-read={readable}")
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_confining_to_a_missing_path_is_an_error_and_runs_nothing(tmp_path):
    if not landlock_abi():
        r = confined_sh(tmp_path, "echo ran", "--fs-read=/")
        assert r.returncode == 1 and "has no Landlock" in r.stderr and "ran" not in r.stdout
        return
    r = confined_sh(tmp_path, "echo ran", f"--fs-read={tmp_path}/missing")
    assert r.returncode == 1 and "ran" not in r.stdout
    assert r.stderr.strip() == (f"soda-launch: cannot confine the guest to {tmp_path}/missing: "
                                "No such file or directory")
