"""bench/profile.py: the summary of a py-spy raw profile (collapsed
stacks), checked against counts worked out by hand."""

from __future__ import annotations

from bench.profile import function_of, summarize

RAW = """\
_bootstrap (threading.py:995);run (threading.py:975);work (/x/soda/master/store.py:10);decode (json/decoder.py:353) 6
_bootstrap (threading.py:995);run (threading.py:975);work (/x/soda/master/store.py:12) 3
_bootstrap (threading.py:995);run (threading.py:975);decode (json/decoder.py:355) 1
not a stack line
"""


def test_self_counts_the_innermost_frame_and_total_every_function_once():
    summary = summarize(RAW.splitlines(keepends=True), top=10)
    assert summary["samples"] == 10
    own = {e["function"]: e["samples"] for e in summary["self"]}
    # Lines of one function count together.
    assert own == {"decode (json/decoder.py)": 7, "work (/x/soda/master/store.py)": 3}
    total = {e["function"]: e["samples"] for e in summary["total"]}
    assert total["run (threading.py)"] == 10
    assert total["work (/x/soda/master/store.py)"] == 9
    assert total["decode (json/decoder.py)"] == 7
    assert summary["self"][0]["share"] == 0.7


def test_top_keeps_the_best_and_an_empty_profile_has_no_shares():
    assert [e["function"] for e in summarize(RAW.splitlines(), top=1)["total"]] == ["_bootstrap (threading.py)"]
    assert summarize([], top=5) == {"samples": 0, "self": [], "total": []}


def test_a_frame_without_a_line_and_a_site_packages_path_read_well():
    assert function_of("f (x.py)") == "f (x.py)"
    assert function_of("_serve (/v/lib/python3.11/site-packages/grpc/_server.py:1)") == "_serve (grpc/_server.py)"
