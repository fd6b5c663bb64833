"""Placement of virtual nodes on physical nodes: a pure function.

`place(nodes, requests, ...)` returns one placement per request or raises
NoCapacity naming the resource that is short. It is all-or-nothing: it
never returns a partial answer. No store, no clock, no I/O.

A node boots guests no smaller than the minimum it registered for each
hypervisor (the kernel sets it: SODA's UML kernel 16 MiB, Debian's 32,
QEMU's 96). A request that no ready node offering the hypervisor could boot
is refused with InvalidSpec (INVALID_ARGUMENT), before any capacity check:
unlike a shortage it does not go away when guests stop or the caller
retries; only a request with more memory (or a node with a smaller kernel)
helps, and sodactl must not report it as "no room" (exit 3), which scripts
treat as "retry later".

A guest costs a node more memory than it asks for: its hypervisor process
needs its own (UML's kernel threads and page tables, QEMU's device model),
and the Daemon's memory limit adds it. Each node registers that overhead per
hypervisor; placement counts guest memory plus overhead (`charged`).

Policy, among the nodes a request fits on: spread a service's virtual nodes
over failure domains first (the zone with fewest of this service: a node's
`zone` label names its zone, and the nodes without one form one zone of
their own), then over physical nodes within them (fewest of this service),
then least-loaded first (the lowest of the largest fraction of any resource
in use after placing), then name, for determinism. A zone with no room is
passed over, never a reason to refuse: spreading is a preference, fitting
is a rule.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Mapping, Sequence

from soda import model
from soda.errors import InvalidSpec, NoCapacity

_EPSILON = 1e-9
_RESOURCES = ("cpu", "memory", "bandwidth", "disk")
# The node label that names a node's failure domain.
ZONE_LABEL = "zone"
# The zone of the nodes that carry no zone label: one zone, not one each,
# so that a cluster without labels spreads over nodes as it always did.
UNZONED = ""


@dataclass(frozen=True)
class Placement:
    node: str
    hypervisor: str


def _fits(free: model.Resources, want: model.Resources) -> bool:
    return all(getattr(free, r) + _EPSILON >= getattr(want, r) for r in _RESOURCES)


def _load_after(node: model.Node, used: model.Resources, want: model.Resources) -> float:
    fractions = []
    for r in _RESOURCES:
        cap = getattr(node.capacity, r)
        fractions.append((getattr(used, r) + getattr(want, r)) / cap if cap > 0 else 1.0)
    return max(fractions)


def zone_of(node: model.Node) -> str:
    """The failure domain `node` is in (UNZONED when it names none)."""
    return node.labels.get(ZONE_LABEL, UNZONED)


def charged(node: model.Node, hypervisor: str, want: model.Resources) -> model.Resources:
    """What a guest of `want` under `hypervisor` takes from `node`."""
    return want + model.Resources(memory=node.memory_overhead(hypervisor))


def min_memory(node: model.Node, hypervisor: str) -> int:
    """The smallest guest (MiB) `node` boots under `hypervisor`; 0 when it
    registered no minimum (the spec's own bounds still apply)."""
    limit = node.limit(hypervisor)
    return limit.min_memory if limit is not None else 0


def pick_hypervisor(node: model.Node, wanted: str, memory: int | None = None) -> str:
    """The hypervisor `node` would boot a guest of `memory` MiB with (any
    size when None): the wanted one, else the first preferred one it
    offers that boots that small; "" when none does."""
    # None wanted: the node's own order of preference (its Agent's config).
    for name in (wanted,) if wanted else node.hypervisors:
        if name in node.hypervisors and (memory is None or memory >= min_memory(node, name)):
            return name
    return ""


def check_min_memory(node: model.Node, hypervisor: str, memory: int, label: str) -> None:
    """Raise InvalidSpec when `node` cannot boot `label` at `memory` MiB."""
    floor = min_memory(node, hypervisor)
    if memory < floor:
        raise _too_small(label, memory, hypervisor, node)


def _too_small(label: str, memory: int, hypervisor: str, node: model.Node) -> InvalidSpec:
    limit = node.limit(hypervisor)
    kernel = f" with kernel {limit.kernel}" if limit is not None and limit.kernel else ""
    return InvalidSpec(f"{label} asks for {memory} MiB of memory, below the minimum of "
                       f"{min_memory(node, hypervisor)} MiB for {hypervisor} guests{kernel} "
                       f"on {node.name}: ask for at least {min_memory(node, hypervisor)} MiB")


def _check_boots_somewhere(candidates: Sequence[model.Node], hypervisor: str,
                           want: model.Resources, label: str) -> None:
    """InvalidSpec unless some candidate boots `want`'s memory; the error
    names the most lenient node (the smallest minimum on offer)."""
    if any(pick_hypervisor(n, hypervisor, want.memory) for n in candidates):
        return
    floors = [(min_memory(n, name), n.name, name, n) for n in candidates
              for name in ((hypervisor,) if hypervisor else n.hypervisors)
              if name in n.hypervisors]
    _, _, name, node = min(floors, key=lambda f: f[:3])
    raise _too_small(label, int(want.memory), name, node)


def _fmt(resource: str, value: float) -> str:
    unit = model.RESOURCE_UNITS[resource]
    return f"{value:g} {unit}"


def _shortage(candidates: Sequence[model.Node], used: Mapping[str, model.Resources],
              want: model.Resources, label: str, hypervisor: str) -> NoCapacity:
    """Explain why `want` fits nowhere: the first resource no node has enough of."""
    for r in _RESOURCES:
        best = None          # (free, node, need) with the most room for `want`
        for node in candidates:
            need = getattr(charged(node, pick_hypervisor(node, hypervisor, want.memory), want), r)
            free = getattr(node.capacity, r) - getattr(used[node.name], r)
            if best is None or free - need > best[0] - best[2]:
                best = (free, node, need)
        if best is None or best[0] + _EPSILON < best[2]:
            free, node, need = best or (0, None, getattr(want, r))
            needs = _fmt(r, getattr(want, r))
            if need != getattr(want, r):
                needs += (f" + {_fmt(r, need - getattr(want, r))} for its hypervisor process "
                          f"on {node.name}")
            most = f"the most free on any node is {_fmt(r, max(free, 0))}"
            if node is not None:
                most += f" ({node.name})"
            return NoCapacity(f"not enough {r}: {label} needs {needs}, {most}", resource=r)
    wanted = ", ".join(_fmt(r, getattr(want, r)) for r in _RESOURCES)
    return NoCapacity(f"no single node has room for {label} ({wanted}) at once; "
                      "each resource is free somewhere, but not together", resource="combined")


def place(nodes: Sequence[model.Node], requests: Sequence[model.Resources], *,
          hypervisor: str = "", service_counts: Mapping[str, int] | None = None,
          labels: Sequence[str] | None = None) -> list[Placement]:
    """Place every request or raise NoCapacity.

    `nodes` carry their capacity, labels and what is already allocated on
    them; `service_counts` says how many virtual nodes of this service each
    node already runs (for spreading over zones and nodes); `labels` name
    the requests in errors.
    """
    labels = labels or [f"virtual node {i}" for i in range(len(requests))]
    ready = [n for n in nodes if n.state == "READY"]
    if not requests:
        return []
    if not ready:
        raise NoCapacity("no ready physical nodes: start a soda-agent or wait for one to register",
                         resource="nodes")
    candidates = [n for n in ready if pick_hypervisor(n, hypervisor)]
    if not candidates:
        if not any(hypervisor in n.hypervisors for n in nodes):
            # No node has it at all, ready or not: a mistake, not a shortage.
            offered = sorted({h for n in nodes for h in n.hypervisors})
            raise InvalidSpec(f"no physical node offers hypervisor {hypervisor!r} "
                              f"(offered: {', '.join(offered) or 'none'})")
        raise NoCapacity(f"no ready physical node offers hypervisor {hypervisor!r}", resource="hypervisor")
    # Which candidates boot a guest of a given memory, and with which
    # hypervisor: a service's requests mostly share one size.
    bootable_by_memory: dict[int, list[tuple[model.Node, str]]] = {}

    def bootable(memory: int) -> list[tuple[model.Node, str]]:
        found = bootable_by_memory.get(memory)
        if found is None:
            found = bootable_by_memory[memory] = [
                (n, name) for n in candidates if (name := pick_hypervisor(n, hypervisor, memory))]
        return found

    # Too small to boot anywhere is the caller's mistake, reported before
    # any shortage (which a retry might outlast).
    for i, want in enumerate(requests):
        if not bootable(want.memory):
            _check_boots_somewhere(candidates, hypervisor, want, labels[i])
    used = {n.name: n.allocated for n in candidates}
    counts = {n.name: (service_counts or {}).get(n.name, 0) for n in candidates}
    # A zone's count includes this service's virtual nodes on its ready
    # nodes that take no more (full, or without the hypervisor): they run in
    # that failure domain all the same. Those on LOST nodes are being placed
    # again and count nowhere.
    zone = {n.name: zone_of(n) for n in ready}
    zone_counts: dict[str, int] = {}
    for name, count in (service_counts or {}).items():
        if name in zone:
            zone_counts[zone[name]] = zone_counts.get(zone[name], 0) + count
    # Larger requests first: they are the hard ones to fit, and placing them
    # early avoids refusing a request that a different order could hold.
    order = sorted(range(len(requests)),
                   key=lambda i: tuple(-getattr(requests[i], r) for r in _RESOURCES))
    result: dict[int, Placement] = {}
    # Each request goes to the node of least (zone count, node count, load
    # after, name). Equal requests come one after another in `order`, and
    # within a run of them a node's own part of that key (count, load,
    # name) changes only when a request lands on it: each zone keeps the
    # nodes that fit in a heap on that part, and a request looks at each
    # zone's best node instead of at every node (a 50-node service on 500
    # nodes: ~5 ms instead of ~250 ms). The answer is the same.
    start = 0
    while start < len(order):
        want = requests[order[start]]
        end = start + 1
        while end < len(order) and requests[order[end]] == want:
            end += 1
        pairs = bootable(want.memory)
        heaps: dict[str, list] = {}
        for seq, (node, name) in enumerate(pairs):
            need = charged(node, name, want)
            if _fits(node.capacity - used[node.name], need):
                heaps.setdefault(zone[node.name], []).append(
                    (counts[node.name], _load_after(node, used[node.name], need), node.name, seq,
                     node, name, need))
        for heap in heaps.values():
            heapq.heapify(heap)
        for i in order[start:end]:
            best = None
            for z, heap in heaps.items():
                if heap:
                    key = (zone_counts.get(z, 0), heap[0][0], heap[0][1], heap[0][2])
                    if best is None or key < best[0]:
                        best = (key, z)
            if best is None:
                raise _shortage([n for n, _ in pairs], used, want, labels[i], hypervisor)
            z = best[1]
            _, _, _, seq, node, name, need = heapq.heappop(heaps[z])
            used[node.name] = used[node.name] + need
            counts[node.name] += 1
            zone_counts[z] = zone_counts.get(z, 0) + 1
            result[i] = Placement(node=node.name, hypervisor=name)
            if _fits(node.capacity - used[node.name], need):
                heapq.heappush(heaps[z], (counts[node.name], _load_after(node, used[node.name], need),
                                          node.name, seq, node, name, need))
        start = end
    return [result[i] for i in range(len(requests))]
