from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PENDING: _ClassVar[Phase]
    PULLING: _ClassVar[Phase]
    BOOTING: _ClassVar[Phase]
    RUNNING: _ClassVar[Phase]
    FAILED: _ClassVar[Phase]
    STOPPING: _ClassVar[Phase]
    STOPPED: _ClassVar[Phase]
    FROZEN: _ClassVar[Phase]
    THAWING: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
PENDING: Phase
PULLING: Phase
BOOTING: Phase
RUNNING: Phase
FAILED: Phase
STOPPING: Phase
STOPPED: Phase
FROZEN: Phase
THAWING: Phase

class Resources(_message.Message):
    __slots__ = ("cpu", "memory_mib", "bandwidth_mbit", "disk_mib")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_MBIT_FIELD_NUMBER: _ClassVar[int]
    DISK_MIB_FIELD_NUMBER: _ClassVar[int]
    cpu: float
    memory_mib: int
    bandwidth_mbit: int
    disk_mib: int
    def __init__(self, cpu: _Optional[float] = ..., memory_mib: _Optional[int] = ..., bandwidth_mbit: _Optional[int] = ..., disk_mib: _Optional[int] = ...) -> None: ...

class HealthCheck(_message.Message):
    __slots__ = ("kind", "path", "expect_status", "interval", "timeout", "rise", "fall")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    EXPECT_STATUS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RISE_FIELD_NUMBER: _ClassVar[int]
    FALL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    path: str
    expect_status: int
    interval: float
    timeout: float
    rise: int
    fall: int
    def __init__(self, kind: _Optional[str] = ..., path: _Optional[str] = ..., expect_status: _Optional[int] = ..., interval: _Optional[float] = ..., timeout: _Optional[float] = ..., rise: _Optional[int] = ..., fall: _Optional[int] = ...) -> None: ...

class SwitchSpec(_message.Message):
    __slots__ = ("listen", "policy", "mode", "health", "drain_seconds")
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    DRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    listen: str
    policy: str
    mode: str
    health: HealthCheck
    drain_seconds: float
    def __init__(self, listen: _Optional[str] = ..., policy: _Optional[str] = ..., mode: _Optional[str] = ..., health: _Optional[_Union[HealthCheck, _Mapping]] = ..., drain_seconds: _Optional[float] = ...) -> None: ...

class OnDemand(_message.Message):
    __slots__ = ("max_nodes", "idle_seconds", "resources", "warm", "idle")
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    WARM_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    max_nodes: int
    idle_seconds: float
    resources: Resources
    warm: int
    idle: str
    def __init__(self, max_nodes: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., warm: _Optional[int] = ..., idle: _Optional[str] = ...) -> None: ...

class ServiceSpec(_message.Message):
    __slots__ = ("name", "image", "hypervisor", "nodes", "port", "resources", "switch", "cpu_cap", "on_demand", "template", "network", "boot_timeout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    HYPERVISOR_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    SWITCH_FIELD_NUMBER: _ClassVar[int]
    CPU_CAP_FIELD_NUMBER: _ClassVar[int]
    ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    BOOT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    image: str
    hypervisor: str
    nodes: int
    port: int
    resources: _containers.RepeatedCompositeFieldContainer[Resources]
    switch: SwitchSpec
    cpu_cap: bool
    on_demand: OnDemand
    template: Resources
    network: NetworkSpec
    boot_timeout: float
    def __init__(self, name: _Optional[str] = ..., image: _Optional[str] = ..., hypervisor: _Optional[str] = ..., nodes: _Optional[int] = ..., port: _Optional[int] = ..., resources: _Optional[_Iterable[_Union[Resources, _Mapping]]] = ..., switch: _Optional[_Union[SwitchSpec, _Mapping]] = ..., cpu_cap: _Optional[bool] = ..., on_demand: _Optional[_Union[OnDemand, _Mapping]] = ..., template: _Optional[_Union[Resources, _Mapping]] = ..., network: _Optional[_Union[NetworkSpec, _Mapping]] = ..., boot_timeout: _Optional[float] = ...) -> None: ...

class NetworkSpec(_message.Message):
    __slots__ = ("peers", "egress")
    PEERS_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    peers: bool
    egress: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peers: _Optional[bool] = ..., egress: _Optional[_Iterable[str]] = ...) -> None: ...

class VirtualNode(_message.Message):
    __slots__ = ("name", "service", "index", "node", "address", "prefix_length", "gateway", "resources", "weight", "image_digest", "hypervisor", "port", "phase", "reason", "boot_seconds", "deleting", "generation", "cpu_cap", "usage", "switch_stats", "last_move", "boot_timeout", "frozen", "replaces", "moving_to", "disk_base")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HYPERVISOR_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BOOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DELETING_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CPU_CAP_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SWITCH_STATS_FIELD_NUMBER: _ClassVar[int]
    LAST_MOVE_FIELD_NUMBER: _ClassVar[int]
    BOOT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    MOVING_TO_FIELD_NUMBER: _ClassVar[int]
    DISK_BASE_FIELD_NUMBER: _ClassVar[int]
    name: str
    service: str
    index: int
    node: str
    address: str
    prefix_length: int
    gateway: str
    resources: Resources
    weight: float
    image_digest: str
    hypervisor: str
    port: int
    phase: Phase
    reason: str
    boot_seconds: float
    deleting: bool
    generation: int
    cpu_cap: bool
    usage: VnodeUsage
    switch_stats: SwitchVnodeStats
    last_move: VnodeMove
    boot_timeout: float
    frozen: bool
    replaces: str
    moving_to: str
    disk_base: str
    def __init__(self, name: _Optional[str] = ..., service: _Optional[str] = ..., index: _Optional[int] = ..., node: _Optional[str] = ..., address: _Optional[str] = ..., prefix_length: _Optional[int] = ..., gateway: _Optional[str] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., weight: _Optional[float] = ..., image_digest: _Optional[str] = ..., hypervisor: _Optional[str] = ..., port: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., reason: _Optional[str] = ..., boot_seconds: _Optional[float] = ..., deleting: _Optional[bool] = ..., generation: _Optional[int] = ..., cpu_cap: _Optional[bool] = ..., usage: _Optional[_Union[VnodeUsage, _Mapping]] = ..., switch_stats: _Optional[_Union[SwitchVnodeStats, _Mapping]] = ..., last_move: _Optional[_Union[VnodeMove, _Mapping]] = ..., boot_timeout: _Optional[float] = ..., frozen: _Optional[bool] = ..., replaces: _Optional[str] = ..., moving_to: _Optional[str] = ..., disk_base: _Optional[str] = ...) -> None: ...

class VnodeMove(_message.Message):
    __slots__ = ("from_node", "at", "why")
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    from_node: str
    at: float
    why: str
    def __init__(self, from_node: _Optional[str] = ..., at: _Optional[float] = ..., why: _Optional[str] = ...) -> None: ...

class VnodeUsage(_message.Message):
    __slots__ = ("cpu_seconds", "memory_bytes", "memory_peak_bytes", "bytes_in", "bytes_out", "throttled_seconds", "oom_kills", "packets_refused", "pids_refused")
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    PACKETS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    PIDS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int
    bytes_in: int
    bytes_out: int
    throttled_seconds: float
    oom_kills: int
    packets_refused: int
    pids_refused: int
    def __init__(self, cpu_seconds: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., memory_peak_bytes: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., throttled_seconds: _Optional[float] = ..., oom_kills: _Optional[int] = ..., packets_refused: _Optional[int] = ..., pids_refused: _Optional[int] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("spec", "image_digest", "vnodes", "deleting", "created_at", "owner")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    DELETING_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    spec: ServiceSpec
    image_digest: str
    vnodes: _containers.RepeatedCompositeFieldContainer[VirtualNode]
    deleting: bool
    created_at: float
    owner: str
    def __init__(self, spec: _Optional[_Union[ServiceSpec, _Mapping]] = ..., image_digest: _Optional[str] = ..., vnodes: _Optional[_Iterable[_Union[VirtualNode, _Mapping]]] = ..., deleting: _Optional[bool] = ..., created_at: _Optional[float] = ..., owner: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "address", "capacity", "allocated", "hypervisors", "subnet", "gateway", "state", "vnodes", "last_heartbeat", "usage", "limits", "assumed", "uplink", "labels", "draining", "image_cache")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    HYPERVISORS_FIELD_NUMBER: _ClassVar[int]
    SUBNET_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ASSUMED_FIELD_NUMBER: _ClassVar[int]
    UPLINK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CACHE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    capacity: Resources
    allocated: Resources
    hypervisors: _containers.RepeatedScalarFieldContainer[str]
    subnet: str
    gateway: str
    state: str
    vnodes: int
    last_heartbeat: float
    usage: VnodeUsage
    limits: _containers.RepeatedCompositeFieldContainer[DriverCapabilities]
    assumed: _containers.RepeatedScalarFieldContainer[str]
    uplink: str
    labels: _containers.ScalarMap[str, str]
    draining: bool
    image_cache: ImageCache
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., allocated: _Optional[_Union[Resources, _Mapping]] = ..., hypervisors: _Optional[_Iterable[str]] = ..., subnet: _Optional[str] = ..., gateway: _Optional[str] = ..., state: _Optional[str] = ..., vnodes: _Optional[int] = ..., last_heartbeat: _Optional[float] = ..., usage: _Optional[_Union[VnodeUsage, _Mapping]] = ..., limits: _Optional[_Iterable[_Union[DriverCapabilities, _Mapping]]] = ..., assumed: _Optional[_Iterable[str]] = ..., uplink: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., draining: _Optional[bool] = ..., image_cache: _Optional[_Union[ImageCache, _Mapping]] = ...) -> None: ...

class DriverCapabilities(_message.Message):
    __slots__ = ("hypervisor", "min_memory_mib", "kernel", "memory_overhead_mib", "live_memory", "freeze", "disk_bound", "plumbing", "migration", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HYPERVISOR_FIELD_NUMBER: _ClassVar[int]
    MIN_MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_OVERHEAD_MIB_FIELD_NUMBER: _ClassVar[int]
    LIVE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    DISK_BOUND_FIELD_NUMBER: _ClassVar[int]
    PLUMBING_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    hypervisor: str
    min_memory_mib: int
    kernel: str
    memory_overhead_mib: int
    live_memory: bool
    freeze: bool
    disk_bound: bool
    plumbing: bool
    migration: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, hypervisor: _Optional[str] = ..., min_memory_mib: _Optional[int] = ..., kernel: _Optional[str] = ..., memory_overhead_mib: _Optional[int] = ..., live_memory: _Optional[bool] = ..., freeze: _Optional[bool] = ..., disk_bound: _Optional[bool] = ..., plumbing: _Optional[bool] = ..., migration: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("digest", "names", "size", "created_at", "init", "owners", "public", "parent", "layer", "layer_size", "images", "services", "nodes")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYER_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    names: _containers.RepeatedScalarFieldContainer[str]
    size: int
    created_at: float
    init: str
    owners: _containers.RepeatedScalarFieldContainer[str]
    public: bool
    parent: str
    layer: str
    layer_size: int
    images: _containers.RepeatedScalarFieldContainer[str]
    services: _containers.RepeatedScalarFieldContainer[str]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digest: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., size: _Optional[int] = ..., created_at: _Optional[float] = ..., init: _Optional[str] = ..., owners: _Optional[_Iterable[str]] = ..., public: _Optional[bool] = ..., parent: _Optional[str] = ..., layer: _Optional[str] = ..., layer_size: _Optional[int] = ..., images: _Optional[_Iterable[str]] = ..., services: _Optional[_Iterable[str]] = ..., nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateServiceRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ServiceSpec
    def __init__(self, spec: _Optional[_Union[ServiceSpec, _Mapping]] = ...) -> None: ...

class GetServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[Service]
    def __init__(self, services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ...) -> None: ...

class DeleteServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ResizeServiceRequest(_message.Message):
    __slots__ = ("name", "nodes", "resources")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    name: str
    nodes: int
    resources: _containers.RepeatedCompositeFieldContainer[Resources]
    def __init__(self, name: _Optional[str] = ..., nodes: _Optional[int] = ..., resources: _Optional[_Iterable[_Union[Resources, _Mapping]]] = ...) -> None: ...

class WatchServicesRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class MoveVnodeRequest(_message.Message):
    __slots__ = ("service", "vnode", "to", "cold")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VNODE_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    COLD_FIELD_NUMBER: _ClassVar[int]
    service: str
    vnode: str
    to: str
    cold: bool
    def __init__(self, service: _Optional[str] = ..., vnode: _Optional[str] = ..., to: _Optional[str] = ..., cold: _Optional[bool] = ...) -> None: ...

class FreezeServiceRequest(_message.Message):
    __slots__ = ("name", "vnodes", "frozen")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    vnodes: _containers.RepeatedScalarFieldContainer[str]
    frozen: bool
    def __init__(self, name: _Optional[str] = ..., vnodes: _Optional[_Iterable[str]] = ..., frozen: _Optional[bool] = ...) -> None: ...

class EnsureNodesRequest(_message.Message):
    __slots__ = ("name", "at_least")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AT_LEAST_FIELD_NUMBER: _ClassVar[int]
    name: str
    at_least: int
    def __init__(self, name: _Optional[str] = ..., at_least: _Optional[int] = ...) -> None: ...

class ReleaseNodesRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ServiceEvent(_message.Message):
    __slots__ = ("kind", "service")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ServiceEvent.Kind]
        UPSERT: _ClassVar[ServiceEvent.Kind]
        DELETED: _ClassVar[ServiceEvent.Kind]
    KIND_UNSPECIFIED: ServiceEvent.Kind
    UPSERT: ServiceEvent.Kind
    DELETED: ServiceEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    kind: ServiceEvent.Kind
    service: Service
    def __init__(self, kind: _Optional[_Union[ServiceEvent.Kind, str]] = ..., service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("name", "address", "capacity", "hypervisors", "limits", "assumed", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HYPERVISORS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ASSUMED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    capacity: Resources
    hypervisors: _containers.RepeatedScalarFieldContainer[str]
    limits: _containers.RepeatedCompositeFieldContainer[DriverCapabilities]
    assumed: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., hypervisors: _Optional[_Iterable[str]] = ..., limits: _Optional[_Iterable[_Union[DriverCapabilities, _Mapping]]] = ..., assumed: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class VirtualNodeStatus(_message.Message):
    __slots__ = ("name", "phase", "reason", "boot_seconds", "generation", "usage")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BOOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    phase: Phase
    reason: str
    boot_seconds: float
    generation: int
    usage: VnodeUsage
    def __init__(self, name: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., reason: _Optional[str] = ..., boot_seconds: _Optional[float] = ..., generation: _Optional[int] = ..., usage: _Optional[_Union[VnodeUsage, _Mapping]] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node", "vnodes", "complete", "image_cache")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CACHE_FIELD_NUMBER: _ClassVar[int]
    node: str
    vnodes: _containers.RepeatedCompositeFieldContainer[VirtualNodeStatus]
    complete: bool
    image_cache: ImageCache
    def __init__(self, node: _Optional[str] = ..., vnodes: _Optional[_Iterable[_Union[VirtualNodeStatus, _Mapping]]] = ..., complete: _Optional[bool] = ..., image_cache: _Optional[_Union[ImageCache, _Mapping]] = ...) -> None: ...

class ImageCache(_message.Message):
    __slots__ = ("bytes", "limit", "images")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    limit: int
    images: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bytes: _Optional[int] = ..., limit: _Optional[int] = ..., images: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("heartbeat_seconds", "prime")
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRIME_FIELD_NUMBER: _ClassVar[int]
    heartbeat_seconds: int
    prime: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, heartbeat_seconds: _Optional[int] = ..., prime: _Optional[_Iterable[str]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class WatchNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeSet(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class NodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchAssignmentsRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class AssignmentEvent(_message.Message):
    __slots__ = ("kind", "vnodes")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[AssignmentEvent.Kind]
        SNAPSHOT: _ClassVar[AssignmentEvent.Kind]
        UPSERT: _ClassVar[AssignmentEvent.Kind]
        REMOVE: _ClassVar[AssignmentEvent.Kind]
    KIND_UNSPECIFIED: AssignmentEvent.Kind
    SNAPSHOT: AssignmentEvent.Kind
    UPSERT: AssignmentEvent.Kind
    REMOVE: AssignmentEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    kind: AssignmentEvent.Kind
    vnodes: _containers.RepeatedCompositeFieldContainer[VirtualNode]
    def __init__(self, kind: _Optional[_Union[AssignmentEvent.Kind, str]] = ..., vnodes: _Optional[_Iterable[_Union[VirtualNode, _Mapping]]] = ...) -> None: ...

class ImageHeader(_message.Message):
    __slots__ = ("name", "size", "digest", "init", "public", "base", "encoding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    digest: str
    init: str
    public: bool
    base: str
    encoding: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., digest: _Optional[str] = ..., init: _Optional[str] = ..., public: _Optional[bool] = ..., base: _Optional[str] = ..., encoding: _Optional[str] = ...) -> None: ...

class PushImageRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ImageHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ImageHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class DeleteImageRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    def __init__(self, image: _Optional[str] = ...) -> None: ...

class PullImageRequest(_message.Message):
    __slots__ = ("image", "layer", "encodings")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    image: str
    layer: bool
    encodings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image: _Optional[str] = ..., layer: _Optional[bool] = ..., encodings: _Optional[_Iterable[str]] = ...) -> None: ...

class PullImageResponse(_message.Message):
    __slots__ = ("image", "chunk", "encoding")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    image: Image
    chunk: bytes
    encoding: str
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., chunk: _Optional[bytes] = ..., encoding: _Optional[str] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    def __init__(self, image: _Optional[str] = ...) -> None: ...

class PrimeImageRequest(_message.Message):
    __slots__ = ("image", "nodes")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    image: str
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image: _Optional[str] = ..., nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class PrimeImageResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchImageRequest(_message.Message):
    __slots__ = ("url", "digest", "name", "init", "public", "base")
    URL_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    url: str
    digest: str
    name: str
    init: str
    public: bool
    base: str
    def __init__(self, url: _Optional[str] = ..., digest: _Optional[str] = ..., name: _Optional[str] = ..., init: _Optional[str] = ..., public: _Optional[bool] = ..., base: _Optional[str] = ...) -> None: ...

class ImageTransfer(_message.Message):
    __slots__ = ("encodings", "block_size")
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    encodings: _containers.RepeatedScalarFieldContainer[str]
    block_size: int
    def __init__(self, encodings: _Optional[_Iterable[str]] = ..., block_size: _Optional[int] = ...) -> None: ...

class ImageBlocksRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    def __init__(self, image: _Optional[str] = ...) -> None: ...

class ImageBlocks(_message.Message):
    __slots__ = ("size", "block_size", "hashes")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    size: int
    block_size: int
    hashes: bytes
    def __init__(self, size: _Optional[int] = ..., block_size: _Optional[int] = ..., hashes: _Optional[bytes] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("vnode", "address", "port", "weight", "ready", "frozen", "moving")
    VNODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    MOVING_FIELD_NUMBER: _ClassVar[int]
    vnode: str
    address: str
    port: int
    weight: float
    ready: bool
    frozen: bool
    moving: bool
    def __init__(self, vnode: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., weight: _Optional[float] = ..., ready: _Optional[bool] = ..., frozen: _Optional[bool] = ..., moving: _Optional[bool] = ...) -> None: ...

class EndpointSet(_message.Message):
    __slots__ = ("service", "endpoints", "deleted", "switch", "on_demand", "network")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    SWITCH_FIELD_NUMBER: _ClassVar[int]
    ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    service: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    deleted: bool
    switch: SwitchSpec
    on_demand: OnDemand
    network: NetworkSpec
    def __init__(self, service: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., deleted: _Optional[bool] = ..., switch: _Optional[_Union[SwitchSpec, _Mapping]] = ..., on_demand: _Optional[_Union[OnDemand, _Mapping]] = ..., network: _Optional[_Union[NetworkSpec, _Mapping]] = ...) -> None: ...

class WatchEndpointsRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class SwitchVnodeStats(_message.Message):
    __slots__ = ("vnode", "routable", "healthy", "open", "total", "bytes_in", "bytes_out", "connect_failures", "ttfb_p50", "ttfb_mean", "ttfb_last")
    VNODE_FIELD_NUMBER: _ClassVar[int]
    ROUTABLE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    TTFB_P50_FIELD_NUMBER: _ClassVar[int]
    TTFB_MEAN_FIELD_NUMBER: _ClassVar[int]
    TTFB_LAST_FIELD_NUMBER: _ClassVar[int]
    vnode: str
    routable: bool
    healthy: bool
    open: int
    total: int
    bytes_in: int
    bytes_out: int
    connect_failures: int
    ttfb_p50: float
    ttfb_mean: float
    ttfb_last: float
    def __init__(self, vnode: _Optional[str] = ..., routable: _Optional[bool] = ..., healthy: _Optional[bool] = ..., open: _Optional[int] = ..., total: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., connect_failures: _Optional[int] = ..., ttfb_p50: _Optional[float] = ..., ttfb_mean: _Optional[float] = ..., ttfb_last: _Optional[float] = ...) -> None: ...

class SwitchServiceStats(_message.Message):
    __slots__ = ("service", "listen", "listening", "bind_error", "vnodes")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    LISTENING_FIELD_NUMBER: _ClassVar[int]
    BIND_ERROR_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    service: str
    listen: str
    listening: bool
    bind_error: str
    vnodes: _containers.RepeatedCompositeFieldContainer[SwitchVnodeStats]
    def __init__(self, service: _Optional[str] = ..., listen: _Optional[str] = ..., listening: _Optional[bool] = ..., bind_error: _Optional[str] = ..., vnodes: _Optional[_Iterable[_Union[SwitchVnodeStats, _Mapping]]] = ...) -> None: ...

class SwitchReport(_message.Message):
    __slots__ = ("switch", "listen_hosts", "busy", "services")
    SWITCH_FIELD_NUMBER: _ClassVar[int]
    LISTEN_HOSTS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    switch: str
    listen_hosts: _containers.RepeatedScalarFieldContainer[str]
    busy: _containers.RepeatedScalarFieldContainer[str]
    services: _containers.RepeatedCompositeFieldContainer[SwitchServiceStats]
    def __init__(self, switch: _Optional[str] = ..., listen_hosts: _Optional[_Iterable[str]] = ..., busy: _Optional[_Iterable[str]] = ..., services: _Optional[_Iterable[_Union[SwitchServiceStats, _Mapping]]] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("cpu", "memory_mib", "bandwidth_mbit", "disk_mib", "vnodes", "image_bytes")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_MBIT_FIELD_NUMBER: _ClassVar[int]
    DISK_MIB_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu: float
    memory_mib: int
    bandwidth_mbit: int
    disk_mib: int
    vnodes: int
    image_bytes: int
    def __init__(self, cpu: _Optional[float] = ..., memory_mib: _Optional[int] = ..., bandwidth_mbit: _Optional[int] = ..., disk_mib: _Optional[int] = ..., vnodes: _Optional[int] = ..., image_bytes: _Optional[int] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("cpu", "memory_mib", "bandwidth_mbit", "disk_mib", "vnodes", "image_bytes")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_MBIT_FIELD_NUMBER: _ClassVar[int]
    DISK_MIB_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu: float
    memory_mib: int
    bandwidth_mbit: int
    disk_mib: int
    vnodes: int
    image_bytes: int
    def __init__(self, cpu: _Optional[float] = ..., memory_mib: _Optional[int] = ..., bandwidth_mbit: _Optional[int] = ..., disk_mib: _Optional[int] = ..., vnodes: _Optional[int] = ..., image_bytes: _Optional[int] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("name", "quota", "usage", "services", "images")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    quota: Quota
    usage: TenantUsage
    services: int
    images: int
    def __init__(self, name: _Optional[str] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ..., usage: _Optional[_Union[TenantUsage, _Mapping]] = ..., services: _Optional[int] = ..., images: _Optional[int] = ...) -> None: ...

class SetQuotaRequest(_message.Message):
    __slots__ = ("tenant", "quota")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    quota: Quota
    def __init__(self, tenant: _Optional[str] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ...) -> None: ...

class ServiceLogsRequest(_message.Message):
    __slots__ = ("service", "vnode", "follow", "tail")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VNODE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    service: str
    vnode: str
    follow: bool
    tail: int
    def __init__(self, service: _Optional[str] = ..., vnode: _Optional[str] = ..., follow: _Optional[bool] = ..., tail: _Optional[int] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("data", "vnode")
    DATA_FIELD_NUMBER: _ClassVar[int]
    VNODE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    vnode: str
    def __init__(self, data: _Optional[bytes] = ..., vnode: _Optional[str] = ...) -> None: ...

class WatchLogOrdersRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class LogOrder(_message.Message):
    __slots__ = ("id", "vnode", "follow", "tail")
    ID_FIELD_NUMBER: _ClassVar[int]
    VNODE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    id: str
    vnode: str
    follow: bool
    tail: int
    def __init__(self, id: _Optional[str] = ..., vnode: _Optional[str] = ..., follow: _Optional[bool] = ..., tail: _Optional[int] = ...) -> None: ...

class LogPart(_message.Message):
    __slots__ = ("id", "data", "error", "code")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    error: str
    code: str
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ..., error: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
