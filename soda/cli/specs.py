"""Turning sodactl input (a YAML file, flags) into spec dicts and resources.

Owns reading and merging what the user typed. It holds no rule about what
a valid spec is: every such rule lives in soda.model (parse_spec,
expand_resources), so sodactl and the Master reject the same input with the
same words. Values stay as the user wrote them ("0.5") for that reason.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TextIO

from soda import errors, model

if TYPE_CHECKING:
    import yaml

RESOURCE_KEYS = tuple(model.RESOURCE_BOUNDS)          # cpu, memory, bandwidth, disk
STDIN_PATH = "-"

# A flag's value: one for every virtual node, or a list with one per node.
PerNodeValue = str | list[str]


class UnreadableInput(errors.SodaError):
    """A file named on the command line cannot be read."""


def per_node_values(text: str) -> PerNodeValue:
    """'0.5' -> '0.5' (every node); '0.5,1.0' -> ['0.5', '1.0'] (one per node)."""
    if "," not in text:
        return text.strip()
    return [part.strip() for part in text.split(",")]


def file_size(path: str) -> int:
    """Size of a file that can be opened for reading; one-line error otherwise."""
    try:
        with open(path, "rb"):
            return os.path.getsize(path)
    except OSError as exc:
        raise UnreadableInput(f"{path}: cannot read: {exc.strerror or exc}") from None


def load_spec_file(path: str, stdin: TextIO) -> dict:
    """The YAML document in `path` ('-' = stdin) as a dict; errors name the file."""
    label = "<stdin>" if path == STDIN_PATH else path
    try:
        if path == STDIN_PATH:
            text = stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise UnreadableInput(f"{label}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise errors.InvalidSpec(f"{label}: not a text file (expected UTF-8 YAML)") from None
    # Imported here: ~15 ms of every sodactl's start-up otherwise.
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise errors.InvalidSpec(f"{label}: not valid YAML: {describe_yaml_error(exc)}") from None
    if data is None:
        raise errors.InvalidSpec(f"{label}: empty; expected a service spec")
    if not isinstance(data, dict):
        raise errors.InvalidSpec(f"{label}: a service spec must be a mapping of fields, "
                                 f"not a {type(data).__name__}")
    return data


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line with the position."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def apply_overrides(spec: Mapping[str, Any], *, name: str | None = None, image: str | None = None,
                    nodes: int | None = None, port: int | None = None, hypervisor: str | None = None,
                    listen: str | None = None, policy: str | None = None,
                    mode: str | None = None, health: Mapping[str, Any] | None = None,
                    resources: Mapping[str, PerNodeValue] | None = None,
                    cpu_cap: bool | None = None, on_demand: int | None = None,
                    idle_seconds: float | None = None, warm: int | None = None,
                    idle_policy: str | None = None, peers: bool | None = None,
                    egress: Sequence[str] | None = None, boot_timeout: float | None = None) -> dict:
    """A copy of `spec` with every given flag (not None) replacing its field.
    A service deployed on demand starts at zero nodes unless told otherwise."""
    merged = dict(spec)
    if on_demand is not None and nodes is None and "nodes" not in merged:
        nodes = 0
    for key, value in (("name", name), ("image", image), ("nodes", nodes), ("port", port),
                       ("hypervisor", hypervisor), ("cpu_cap", cpu_cap), ("boot_timeout", boot_timeout)):
        if value is not None:
            merged[key] = value
    merged["resources"] = _overlay(merged.get("resources"), resources or {})
    merged["switch"] = _overlay(merged.get("switch"), {"listen": listen, "policy": policy,
                                                       "mode": mode, "health": health})
    merged["on_demand"] = _overlay(merged.get("on_demand"), {"max_nodes": on_demand,
                                                             "idle_seconds": idle_seconds,
                                                             "warm": warm, "idle": idle_policy})
    merged["network"] = _overlay(merged.get("network"), {"peers": peers,
                                                         "egress": list(egress) if egress else None})
    if merged["on_demand"] is None:
        del merged["on_demand"]
    if merged["network"] is None:
        del merged["network"]
    if merged["resources"] is None:
        del merged["resources"]
    if merged["switch"] is None:
        del merged["switch"]
    return merged


def health_flag(value: str | None) -> dict | None:
    """`--health tcp|none|/PATH` as the spec's switch.health mapping."""
    if value is None:
        return None
    if value in ("tcp", "none"):
        return {"kind": value}
    if value.startswith("/"):
        return {"kind": "http", "path": value}
    raise errors.InvalidSpec(f"--health {value!r}: give tcp, none, or an HTTP path such as /healthz")


def _overlay(section: Any, values: Mapping[str, Any]) -> Any:
    given = {key: value for key, value in values.items() if value is not None}
    if not given:
        return section
    if section is None:
        return given
    if not isinstance(section, Mapping):
        # Leave it as written: parse_spec says what is wrong with it.
        return section
    return {**section, **given}


def resized_resources(current: model.ServiceSpec, nodes: int | None,
                      overrides: Mapping[str, PerNodeValue]) -> tuple[model.Resources, ...]:
    """One Resources per virtual node after a resize: the given flags applied
    over what each node has now. New nodes start from the last node's
    resources (the service's template if there is none)."""
    count = current.nodes if nodes is None else nodes
    template = current.resources[-1] if current.resources else current.template
    base = [current.resources[i] if i < len(current.resources) else template for i in range(count)]
    columns = {key: overrides[key] if overrides.get(key) is not None else [getattr(r, key) for r in base]
               for key in RESOURCE_KEYS}
    return model.expand_resources(count, columns)


def resized_spec(current: model.ServiceSpec, nodes: int | None,
                 overrides: Mapping[str, PerNodeValue]) -> model.ServiceSpec:
    """The spec a resize asks for, checked by the same rules as a new service."""
    count = current.nodes if nodes is None else nodes
    # Check the node count before building anything for that many nodes.
    model.parse_spec({**current.as_dict(), "nodes": count, "resources": None})
    if not count:
        # No node left to carry resources: the service keeps them as its
        # template, with the flags given applied.
        template = {key: getattr(current.template, key) for key in RESOURCE_KEYS}
        template.update({key: value[-1] if isinstance(value, (list, tuple)) else value
                         for key, value in overrides.items() if value is not None})
        return model.parse_spec({**current.as_dict(), "nodes": 0, "resources": template})
    resources = resized_resources(current, count, overrides)
    return model.parse_spec({
        **current.as_dict(), "nodes": count,
        "resources": {key: [getattr(r, key) for r in resources] for key in RESOURCE_KEYS},
    })
