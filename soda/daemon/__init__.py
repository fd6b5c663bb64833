"""The SODA Daemon: fences each virtual node on a physical node.

cgroups (CPU share and cap, memory, pids), tc (HTB both ways on the TAP and
its IFB) and usage accounting, served to the local Agent over gRPC on a Unix
socket. Modules: config (DaemonConfig), plan (pure values), cgroups
(backends), tc (pyroute2), limits (LimitManager), api (servicer), main.
Never imports the Master, Agent or Switch packages.
"""
