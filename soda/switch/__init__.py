"""The Service Switch: one listener per service, connections spread over the
service's ready virtual nodes in proportion to their shares.

balancer.py (pure policies), proxy.py (asyncio data path), health.py
(active health checks, observed by the proxy and the kernel path),
metrics.py (per virtual node counters, /metrics, the report to the Master),
endpoints.py (endpoint lists from the Master), main.py (`soda-switch`). It shares only
soda.model, soda.errors, soda.config and soda.rpc with the other parts.
"""
