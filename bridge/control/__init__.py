"""Live control: the parameter schema and store, and the OSC server that speaks them."""

from bridge.control.client import OscClient
from bridge.control.osc_server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    OscPortInUseError,
    OscServer,
    OscServerError,
    OscStats,
    parse_allow,
    parse_target,
)
from bridge.control.params import PARAMS, Param, ParamError, Value, osc_table_markdown
from bridge.control.store import ParamStore, Snapshot

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "PARAMS",
    "OscClient",
    "OscPortInUseError",
    "OscServer",
    "OscServerError",
    "OscStats",
    "Param",
    "ParamError",
    "ParamStore",
    "Snapshot",
    "Value",
    "osc_table_markdown",
    "parse_allow",
    "parse_target",
]
