"""SODA's domain objects, one module per concept:

- `names`: names of services, nodes, images, hypervisors, and their rules;
- `labels`: a physical node's KEY=VALUE labels and their rules;
- `spec`: a service spec and its validation (`parse_spec`);
- `state`: the cluster state the Master keeps (services, virtual nodes, nodes, images);
- `usage`: what virtual nodes use, as the Daemons measure it;
- `switching`: endpoints the Switch serves and the reports it sends back;
- `fence`: the Daemon's fence of one virtual node;
- `tenancy`: ASP tenants, what they own and their quotas.

Plain frozen dataclasses shared by every part (Master, Agent, Daemon,
Switch, sodactl); no I/O and no grpc. The names below are the package's
public surface, so `from soda import model` reads `model.ServiceSpec`.
"""

from soda.model.names import (  # noqa: F401
    SERVICE_NAME_MAX, NODE_NAME_MAX, IMAGE_NAME_RE, DIGEST_RE, check_dns_label,
    check_image_ref, check_image_name, check_hypervisor_name, vnode_name)
from soda.model.spec import (  # noqa: F401
    POLICIES, DEFAULT_POLICY, IDLE_POLICIES, SWITCH_MODES, DEFAULT_SWITCH_MODE, HEALTH_KINDS, DEFAULT_PORT,
    MAX_VNODES_PER_SERVICE, RESOURCE_BOUNDS, RESOURCE_UNITS, RESOURCE_DEFAULTS, Resources,
    HealthCheck, SwitchSpec, OnDemand, EgressRule, NetworkSpec, ServiceSpec, resource_columns, expand_resources,
    check_listen, parse_health, last_entries, parse_on_demand, parse_switch, parse_egress, parse_network,
    parse_spec,
    validate_spec, share_weight)
from soda.model.labels import (  # noqa: F401
    LABEL_PART_MAX, LABELS_MAX, check_labels, parse_label, format_labels)
from soda.model.usage import (  # noqa: F401
    Usage, USAGE_FIELDS, VnodeUsage)
from soda.model.state import (  # noqa: F401
    Phase, VnodeMove, VirtualNode, Service, DriverCapabilities, Node, Image, check_disk_holds_image,
    VirtualNodeStatus, retry_note, retries_temporary_failure, ImageCacheState, HeartbeatAnswer)
from soda.model.switching import (  # noqa: F401
    Endpoint, SwitchVnodeStats, SwitchServiceStats, SwitchReport, EndpointSet)
from soda.model.fence import (  # noqa: F401
    Limits, Fence, Released)
from soda.model.tenancy import (  # noqa: F401
    OPERATORS, QUOTA_FIELDS, Quota, TenantUsage, Tenant, check_tenant_name, usage_of, check_quota,
    owned_by, may_use, check_image_use, as_seen_by)
