"""The parameter store: validated, versioned values that the engine reads between frames."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from bridge.control.params import (
    PARAMS,
    PARAMS_BY_NAME,
    ParamError,
    Value,
    check_together,
    default_values,
)


@dataclass(frozen=True)
class Snapshot:
    """Every parameter's value at one version of the store; never changes after it is taken.

    `changed_at` holds, for each name, the store version at which its value last changed.
    """

    values: Mapping[str, Value]
    version: int
    changed_at: Mapping[str, int]

    def __getitem__(self, name: str) -> Value:
        """Return the value of parameter `name`."""
        return self.values[name]

    def changed_since(self, version: int) -> frozenset[str]:
        """Return the names whose value changed after store version `version`."""
        return frozenset(name for name, at in self.changed_at.items() if at > version)


class ParamStore:
    """Thread-safe holder of the live parameters.

    Writers (the OSC server, the CLI) call `set` or `set_many`; each call is validated as a
    whole and either applied entirely, as one new version, or refused with `ParamError`. The
    engine calls `snapshot` between two frames and so never sees half of a change.
    """

    def __init__(self, initial: Mapping[str, object] | None = None) -> None:
        values = default_values()
        if initial:
            values.update(_validated(initial))
            check_together(values, initial)
        self._lock = threading.Lock()
        self._snapshot = Snapshot(
            values=MappingProxyType(values),
            version=0,
            changed_at=MappingProxyType({p.name: 0 for p in PARAMS}),
        )

    @property
    def version(self) -> int:
        """The version of the latest change; 0 until the first one."""
        return self._snapshot.version

    def get(self, name: str) -> Value:
        """Return the current value of parameter `name`."""
        if name not in PARAMS_BY_NAME:
            raise _unknown(name)
        return self._snapshot.values[name]

    def snapshot(self) -> Snapshot:
        """Return all current values as one consistent, immutable `Snapshot`."""
        return self._snapshot

    def set(self, name: str, value: object) -> None:
        """Validate and store one value; raise `ParamError` and keep the old one if invalid."""
        self.set_many({name: value})

    def set_many(self, changes: Mapping[str, object]) -> None:
        """Validate and store several values at once: all of them, or none and `ParamError`.

        Values equal to the stored ones are not counted as changes; if nothing changes, the
        version stays the same.
        """
        validated = _validated(changes)
        with self._lock:
            current = self._snapshot
            changed = {name for name, value in validated.items() if current.values[name] != value}
            if not changed:
                return
            values = {**current.values, **validated}
            check_together(values, changed)
            version = current.version + 1
            changed_at = dict(current.changed_at)
            changed_at.update(dict.fromkeys(changed, version))
            self._snapshot = Snapshot(
                values=MappingProxyType(values),
                version=version,
                changed_at=MappingProxyType(changed_at),
            )


def _unknown(name: str) -> ParamError:
    return ParamError(
        name,
        f"unknown parameter {name!r}; use one of " + ", ".join(PARAMS_BY_NAME) + ".",
    )


def _validated(changes: Mapping[str, object]) -> dict[str, Value]:
    validated: dict[str, Value] = {}
    for name, value in changes.items():
        param = PARAMS_BY_NAME.get(name)
        if param is None:
            raise _unknown(name)
        validated[name] = param.validate(value)
    return validated
