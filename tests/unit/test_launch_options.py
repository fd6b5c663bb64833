"""The launcher's command line: --nofile, --user and --group (the VMM's
open-files limit and the uid it drops to), checked before anything happens
(one line, status 2)."""

import subprocess
import sys

import pytest

from soda.hypervisors.launch import USAGE, LaunchError, parse

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
