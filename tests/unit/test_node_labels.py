"""Node labels: their rules, the Agent's config file and --label flags, and
the way through protobuf to the Master and back."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from soda import model
from soda.agent.main import build_config, main, parse_args
from soda.errors import InvalidSpec
from soda.proto.v1 import master_pb2 as pb
from soda.rpc import convert

# Independent of soda.model.labels: what a valid key or value is.
VALID_PART = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


# ---- the rules -----------------------------------------------------------------

def test_valid_labels_come_back_sorted_by_key():
    assert model.check_labels({"zone": "a", "rack": "r-1", "tier": "0"}) == {
        "rack": "r-1", "tier": "0", "zone": "a"}
    assert list(model.check_labels({"zone": "a", "rack": "r1"})) == ["rack", "zone"]
    assert model.check_labels(None) == {} and model.check_labels({}) == {}


@pytest.mark.parametrize("labels, words", [
    ({"Zone": "a"}, "invalid label key 'Zone'"),
    ({"zone": "A"}, "invalid label value 'A' of label 'zone'"),
    ({"zone": ""}, "label value of label 'zone' is empty"),
    ({"": "a"}, "label key is empty"),
    ({"-zone": "a"}, "invalid label key '-zone'"),
    ({"zone": "a-"}, "invalid label value 'a-'"),
    ({"zone": "a_b"}, "invalid label value 'a_b'"),
    ({"zone": "a.b"}, "invalid label value 'a.b'"),
    ({"zone": "a\n"}, "invalid label value 'a\\n'"),
    ({"k" * 64: "a"}, "at most 63 characters"),
    ({"zone": "v" * 64}, "at most 63 characters"),
    ({"zone": 1}, "label value of label 'zone' must be a string, got 1"),
    ({1: "a"}, "label key must be a string, got 1"),
    (["zone=a"], "labels must be a mapping"),
    ({f"k{i}": "v" for i in range(33)}, "at most 32 labels, got 33"),
])
def test_invalid_labels_are_refused_in_one_line(labels, words):
    with pytest.raises(InvalidSpec) as info:
        model.check_labels(labels)
    assert words in str(info.value) and "\n" not in str(info.value).replace("\\n", "")


@given(VALID_PART, VALID_PART)
def test_any_dns_label_like_key_and_value_is_accepted(key, value):
    assert model.check_labels({key: value}) == {key: value}
    assert model.parse_label(f"{key}={value}") == (key, value)


@given(st.text(alphabet="aZ09-_.= \n", max_size=70))
def test_exactly_the_dns_label_like_values_are_accepted(value):
    valid = re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", value) is not None
    try:
        model.check_labels({"zone": value})
    except InvalidSpec:
        assert not valid
    else:
        assert valid


def test_parse_label_wants_key_equals_value():
    assert model.parse_label("zone=a") == ("zone", "a")
    with pytest.raises(InvalidSpec, match=r"label 'zone' must be KEY=VALUE, e.g. zone=a"):
        model.parse_label("zone")
    with pytest.raises(InvalidSpec, match="invalid label value 'a=b'"):
        model.parse_label("zone=a=b")
    with pytest.raises(InvalidSpec, match="label value of label 'zone' is empty"):
        model.parse_label("zone=")


def test_format_labels():
    assert model.format_labels({"zone": "a", "rack": "r1"}) == "rack=r1,zone=a"
    assert model.format_labels({}) == ""


# ---- the Agent's config and flags ----------------------------------------------------

def test_labels_from_the_config_file_and_flags(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("labels: {zone: a, rack: 7}\n")
    from_file = build_config(parse_args(["--config", str(config)]))
    assert from_file.labels == {"rack": "7", "zone": "a"}      # YAML's 7 is the label "7"
    both = build_config(parse_args(["--config", str(config), "--label", "zone=b",
                                    "--label", "tier=web"]))
    assert both.labels == {"rack": "7", "tier": "web", "zone": "b"}   # a flag wins over the file
    assert build_config(parse_args(["--label", "zone=c"])).labels == {"zone": "c"}
    assert build_config(parse_args([])).labels == {}


@pytest.mark.parametrize("text, words", [
    ("labels: {zone: no}\n", "agent.yaml.labels.zone: expected a string, got False (quote it)"),
    ("labels: [zone=a]\n", "agent.yaml.labels: expected a mapping of names to strings"),
    ("labels: {zone: Upper}\n", "invalid label value 'Upper' of label 'zone'"),
])
def test_bad_labels_in_the_config_file_are_one_line_and_exit_2(tmp_path, capsys, text, words):
    config = tmp_path / "agent.yaml"
    config.write_text(text)
    assert main(["--config", str(config), "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


@pytest.mark.parametrize("flag, words", [
    ("zone", "label 'zone' must be KEY=VALUE"),
    ("Zone=a", "invalid label key 'Zone'"),
])
def test_a_bad_label_flag_is_a_usage_error(capsys, flag, words):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--label", flag])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


# ---- through protobuf ------------------------------------------------------------------

def test_labels_round_trip_through_the_node_message():
    node = model.Node(name="n1", address="192.0.2.1", capacity=model.Resources(1, 512, 100, 1000),
                      hypervisors=("fake",), labels={"zone": "a", "rack": "r1"})
    message = convert.node_to_pb(node)
    assert dict(message.labels) == {"zone": "a", "rack": "r1"}
    again = convert.node_from_pb(pb.Node.FromString(message.SerializeToString()))
    assert again == node and list(again.labels) == ["rack", "zone"]
    bare = convert.node_from_pb(convert.node_to_pb(model.Node(
        name="n2", address="192.0.2.2", capacity=node.capacity, hypervisors=("fake",))))
    assert bare.labels == {}
