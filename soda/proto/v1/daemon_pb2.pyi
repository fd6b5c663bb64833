from soda.proto.v1 import master_pb2 as _master_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplyLimitsRequest(_message.Message):
    __slots__ = ("name", "resources", "hypervisor", "tap", "cpu_cap", "memory_overhead_mib")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    HYPERVISOR_FIELD_NUMBER: _ClassVar[int]
    TAP_FIELD_NUMBER: _ClassVar[int]
    CPU_CAP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_OVERHEAD_MIB_FIELD_NUMBER: _ClassVar[int]
    name: str
    resources: _master_pb2.Resources
    hypervisor: str
    tap: str
    cpu_cap: bool
    memory_overhead_mib: int
    def __init__(self, name: _Optional[str] = ..., resources: _Optional[_Union[_master_pb2.Resources, _Mapping]] = ..., hypervisor: _Optional[str] = ..., tap: _Optional[str] = ..., cpu_cap: _Optional[bool] = ..., memory_overhead_mib: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("cpu_shares", "cpu_quota_us", "cpu_period_us", "memory_bytes", "pids_max", "rate_bit", "burst_bytes")
    CPU_SHARES_FIELD_NUMBER: _ClassVar[int]
    CPU_QUOTA_US_FIELD_NUMBER: _ClassVar[int]
    CPU_PERIOD_US_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_MAX_FIELD_NUMBER: _ClassVar[int]
    RATE_BIT_FIELD_NUMBER: _ClassVar[int]
    BURST_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_shares: int
    cpu_quota_us: int
    cpu_period_us: int
    memory_bytes: int
    pids_max: int
    rate_bit: int
    burst_bytes: int
    def __init__(self, cpu_shares: _Optional[int] = ..., cpu_quota_us: _Optional[int] = ..., cpu_period_us: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., pids_max: _Optional[int] = ..., rate_bit: _Optional[int] = ..., burst_bytes: _Optional[int] = ...) -> None: ...

class Fence(_message.Message):
    __slots__ = ("name", "cgroups", "cgroup_version", "tap", "ifb", "limits", "frozen")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CGROUPS_FIELD_NUMBER: _ClassVar[int]
    CGROUP_VERSION_FIELD_NUMBER: _ClassVar[int]
    TAP_FIELD_NUMBER: _ClassVar[int]
    IFB_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    cgroups: _containers.RepeatedScalarFieldContainer[str]
    cgroup_version: str
    tap: str
    ifb: str
    limits: Limits
    frozen: bool
    def __init__(self, name: _Optional[str] = ..., cgroups: _Optional[_Iterable[str]] = ..., cgroup_version: _Optional[str] = ..., tap: _Optional[str] = ..., ifb: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., frozen: _Optional[bool] = ...) -> None: ...

class ReleaseLimitsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReleaseLimitsResponse(_message.Message):
    __slots__ = ("name", "existed", "killed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    KILLED_FIELD_NUMBER: _ClassVar[int]
    name: str
    existed: bool
    killed: int
    def __init__(self, name: _Optional[str] = ..., existed: _Optional[bool] = ..., killed: _Optional[int] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("name", "cpu_seconds", "cpu_throttled_seconds", "memory_bytes", "memory_peak_bytes", "memory_limit_bytes", "memory_failcnt", "oom_kills", "pids", "bytes_to_guest", "bytes_from_guest", "drops_to_guest", "drops_from_guest", "pids_refused")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_THROTTLED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FAILCNT_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_TO_GUEST_FIELD_NUMBER: _ClassVar[int]
    BYTES_FROM_GUEST_FIELD_NUMBER: _ClassVar[int]
    DROPS_TO_GUEST_FIELD_NUMBER: _ClassVar[int]
    DROPS_FROM_GUEST_FIELD_NUMBER: _ClassVar[int]
    PIDS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    cpu_seconds: float
    cpu_throttled_seconds: float
    memory_bytes: int
    memory_peak_bytes: int
    memory_limit_bytes: int
    memory_failcnt: int
    oom_kills: int
    pids: int
    bytes_to_guest: int
    bytes_from_guest: int
    drops_to_guest: int
    drops_from_guest: int
    pids_refused: int
    def __init__(self, name: _Optional[str] = ..., cpu_seconds: _Optional[float] = ..., cpu_throttled_seconds: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., memory_peak_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., memory_failcnt: _Optional[int] = ..., oom_kills: _Optional[int] = ..., pids: _Optional[int] = ..., bytes_to_guest: _Optional[int] = ..., bytes_from_guest: _Optional[int] = ..., drops_to_guest: _Optional[int] = ..., drops_from_guest: _Optional[int] = ..., pids_refused: _Optional[int] = ...) -> None: ...

class FreezeVnodeRequest(_message.Message):
    __slots__ = ("name", "frozen")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    frozen: bool
    def __init__(self, name: _Optional[str] = ..., frozen: _Optional[bool] = ...) -> None: ...

class ListVnodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVnodesResponse(_message.Message):
    __slots__ = ("vnodes",)
    VNODES_FIELD_NUMBER: _ClassVar[int]
    vnodes: _containers.RepeatedCompositeFieldContainer[Fence]
    def __init__(self, vnodes: _Optional[_Iterable[_Union[Fence, _Mapping]]] = ...) -> None: ...
