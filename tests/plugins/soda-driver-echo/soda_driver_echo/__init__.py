"""`echo`: a hypervisor driver that lives outside SODA's tree.

SODA finds it only through the `soda.hypervisors` entry point this
distribution declares (pyproject.toml): `soda-agent --hypervisor echo`
offers it, the node registers its capabilities, and the driver conformance
suite holds it to the same contract as SODA's own drivers. Its guests are
pretend ones, kept as records like the built-in `fake` driver's (it reuses
that driver's bookkeeping), but it declares other capabilities: no live
memory change, and stop-and-copy migration.
"""

from soda.hypervisors.fake import FakeDriver


class EchoDriver(FakeDriver):
    name = "echo"
    live_memory = False
    migration = "stop-and-copy"

    def set_memory(self, name: str, memory_mib: int) -> bool:
        # Declared without live memory change: a new size is a new boot.
        return False
