"""The one HOST:PORT parser and formatter."""

import pytest

from soda.addresses import join_host_port, split_host_port
from soda.errors import InvalidSpec


@pytest.mark.parametrize("address, parsed", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:8080", ("::1", 8080)),
    ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
    ("localhost:80", ("localhost", 80)),
    ("master.example.org:7070", ("master.example.org", 7070)),
])
def test_parses_ipv4_ipv6_in_brackets_and_hostnames(address, parsed):
    assert split_host_port(address) == parsed


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:0", "port from 1 to 65535"),
    ("127.0.0.1:65536", "port from 1 to 65535"),
    ("127.0.0.1:http", "port from 1 to 65535"),
    ("127.0.0.1:", "port from 1 to 65535"),
    ("127.0.0.1:-1", "port from 1 to 65535"),
    (":8080", "the host is missing"),
    ("[]:8080", "the host is missing"),
    ("8080", "expected HOST:PORT"),
    ("", "expected HOST:PORT"),
    (None, "expected HOST:PORT"),
    (8080, "expected HOST:PORT"),
])
def test_refuses_bad_ports_and_missing_hosts(address, message):
    with pytest.raises(InvalidSpec, match=message):
        split_host_port(address)


def test_the_error_names_what_was_parsed():
    with pytest.raises(InvalidSpec, match=r"^switch.listen '8080': expected HOST:PORT"):
        split_host_port("8080", "switch.listen")


@pytest.mark.parametrize("host, port, address", [
    ("127.0.0.1", 80, "127.0.0.1:80"),
    ("::1", 8080, "[::1]:8080"),
    ("localhost", 7070, "localhost:7070"),
])
def test_join_is_the_inverse_of_split(host, port, address):
    assert join_host_port(host, port) == address
    assert split_host_port(address) == (host, port)
