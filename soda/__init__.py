"""SODA: Service-On-Demand Architecture.

gRPC's fork handlers are switched off here, before any module imports
grpc: SODA's daemons never fork to run Python (soda.service.forbid_fork),
only to exec programs (ip, nft, tc, the VMMs), and with TLS traffic on
other threads grpc's handlers around such a fork now and then left the
child to die of SIGSEGV before its exec (seen as `ip exited -11` in a
Switch taking its nft table over). A daemon's environment may still set
GRPC_ENABLE_FORK_SUPPORT.
"""

import os as _os

_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
