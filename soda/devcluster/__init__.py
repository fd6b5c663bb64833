"""The local-cluster launcher: a whole SODA cluster on this machine (Master,
a node's Daemon and Agent, a Switch), started, supervised and taken down as
one, for scripts/demo, the system tests and the benchmarks.

`LocalCluster` and `ClusterConfig` (soda.devcluster.cluster) are the library;
`soda-devcluster` (soda.devcluster.main) is the command; the restart
decisions live in soda.devcluster.supervisor.
"""

from soda.devcluster.cluster import ClusterConfig, ClusterError, LocalCluster, teardown
from soda.devcluster.supervisor import RestartPolicy

__all__ = ["ClusterConfig", "ClusterError", "LocalCluster", "RestartPolicy", "teardown"]
