"""Sending the disk of a guest that moves to another node.

Owns `<state_dir>/moves/`: a guest's whole disk, written there by its
driver (`export_disk`) while the guest is frozen, is sent to the Master as
a layer over the virtual node's `disk_base` (only the blocks in which it
differs travel, zstd-compressed where the Master takes it, checked against
its sha256 there) and removed. What a killed Agent left there is removed at
start. It must not talk gRPC itself: sending goes through the MasterClient
it is given (anything with `push_vnode_disk(path, vnode, base)`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time

from soda.hypervisors.base import HypervisorDriver
from soda.model.state import VirtualNode

log = logging.getLogger(__name__)


class DiskSender:
    def __init__(self, directory: str, client):
        self.directory = directory
        self._client = client
        shutil.rmtree(directory, ignore_errors=True)    # an earlier Agent's half-sent disks
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def send(self, vnode: VirtualNode, driver: HypervisorDriver) -> None:
        """Export the frozen guest's disk and send it for `vnode`'s move."""
        path = os.path.join(self.directory, f"{vnode.name}.disk")
        began = time.monotonic()
        try:
            driver.export_disk(vnode.name, path)
            exported = time.monotonic()
            image = self._client.push_vnode_disk(path, vnode.name, vnode.disk_base)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log.info("virtual node %s: its disk (%d bytes, a layer of %d) went to the Master for its move to "
                 "%s in %.2f s (%.2f s to export it)", vnode.name, image.size, image.layer_size,
                 vnode.moving_to, time.monotonic() - began, exported - began)
