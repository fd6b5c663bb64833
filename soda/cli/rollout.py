"""Where a service stands against its spec, read from one snapshot.

Owns sodactl's notion of "done" for `--wait` and the STATE it shows: a pure
function of a soda.model.Service. The Master and Agents decide phases;
this module only counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from soda import model

# How many virtual nodes a one-line message names before it says "and N more".
NAMED_IN_MESSAGE = 5


@dataclass(frozen=True)
class Rollout:
    name: str
    wanted: int                                   # spec.nodes
    deleting: bool                                # the whole service is going away
    running: tuple[model.VirtualNode, ...]
    waiting: tuple[model.VirtualNode, ...]        # wanted, not RUNNING yet, not FAILED
    failed: tuple[model.VirtualNode, ...]         # FAILED for good, as far as anyone can tell
    leaving: tuple[model.VirtualNode, ...]        # marked for removal (resize down), still there
    # FAILED for a cause that should pass by itself (the Daemon restarting),
    # which its Agent retries: still on its way.
    retrying: tuple[model.VirtualNode, ...] = ()
    frozen: tuple[model.VirtualNode, ...] = ()    # asked to freeze and FROZEN: at rest, not waiting

    @classmethod
    def of(cls, service: model.Service) -> "Rollout":
        staying = [v for v in service.vnodes if not v.deleting]
        failed = [v for v in staying if v.phase == model.Phase.FAILED]
        frozen = [v for v in staying if v.frozen and v.phase == model.Phase.FROZEN]
        return cls(
            name=service.name,
            wanted=service.spec.nodes,
            deleting=service.deleting,
            running=tuple(v for v in staying if v.phase == model.Phase.RUNNING and not v.frozen),
            # Neither failed nor at rest (RUNNING, or FROZEN when asked to
            # be): booting, thawing, asked to freeze and not frozen yet.
            waiting=tuple(v for v in staying if v.phase != model.Phase.FAILED
                          and v.phase != (model.Phase.FROZEN if v.frozen else model.Phase.RUNNING)),
            frozen=tuple(frozen),
            failed=tuple(v for v in failed if not model.retries_temporary_failure(v)),
            leaving=tuple(v for v in service.vnodes if v.deleting),
            retrying=tuple(v for v in failed if model.retries_temporary_failure(v)),
        )

    @property
    def done(self) -> bool:
        """Every wanted virtual node runs and every unwanted one is gone."""
        return (not self.deleting and not self.failed and not self.retrying and not self.waiting
                and not self.leaving and len(self.running) + len(self.frozen) == self.wanted)

    @property
    def moving(self) -> int:
        """Live virtual nodes beyond what the service wants: replacements of
        virtual nodes on a draining node, which leave once these run (only
        a move makes a service hold more than it wants)."""
        staying = (len(self.running) + len(self.frozen) + len(self.waiting) + len(self.failed)
                   + len(self.retrying))
        return max(0, staying - self.wanted) if not self.deleting else 0

    @property
    def state(self) -> str:
        if self.deleting:
            return "DELETING"
        if self.failed:
            return "FAILED"
        if self.done:
            # A service may rest at zero virtual nodes (deploy on first request).
            if self.frozen and not self.running:
                return "FROZEN"
            return "RUNNING" if self.wanted else "IDLE"
        if self.moving:
            return "MOVING"
        if self.leaving and not self.waiting and len(self.running) == self.wanted:
            return "SCALING"
        return "PENDING"

    def progress(self) -> str:
        """`web: 3/4 running`, plus what else is going on."""
        text = f"{self.name}: {min(len(self.running), self.wanted)}/{self.wanted} running"
        if self.frozen:
            text += f", {len(self.frozen)} frozen"
        if self.moving:
            text += f", {self.moving} moving"
        if self.failed:
            text += f", {len(self.failed)} failed"
        if self.retrying:
            text += f", {len(self.retrying)} retrying"
        if self.leaving:
            text += f", {len(self.leaving)} stopping"
        return text

    def failures(self) -> str:
        """One line naming each failed virtual node, where it ran and why."""
        return "; ".join(f"{v.name} failed on {v.node or 'no node'}: {v.reason or 'no reason given'}"
                         for v in self.failed)

    def not_running(self) -> str:
        """One line naming what keeps the service from being done."""
        parts = [f"{v.name} ({describe(v)})" for v in self.waiting + self.retrying]
        parts += [f"{v.name} (still stopping)" for v in self.leaving]
        missing = (self.wanted - len(self.running) - len(self.frozen) - len(self.waiting)
                   - len(self.failed) - len(self.retrying))
        if missing > 0:
            parts.append(f"{missing} not created yet")
        return name_some(parts)


def describe(vnode: model.VirtualNode) -> str:
    where = f"on {vnode.node}" if vnode.node else "not placed"
    reason = f": {vnode.reason}" if vnode.reason else ""
    return f"{vnode.phase.name} {where}{reason}"


def name_some(parts: list[str]) -> str:
    if len(parts) <= NAMED_IN_MESSAGE:
        return ", ".join(parts)
    return ", ".join(parts[:NAMED_IN_MESSAGE]) + f" and {len(parts) - NAMED_IN_MESSAGE} more"
