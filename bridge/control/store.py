"""The parameter store: validated, versioned values that the engine reads between frames.

Besides the schema's parameters a store can carry families of indexed ones, made at start for
what the bridge loaded (one `/sd/lora/<index>/scale` per LoRA file): the store, and through it the
OSC server, `/sd/list` and `/sd/get`, treat them like any other parameter.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from bridge.control.params import (
    FAMILIES,
    PARAMS,
    Param,
    ParamError,
    ParamFamily,
    Value,
    check_together,
    find_param,
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

    `families` maps a `ParamFamily` to the start values of its members, one per loaded item
    (`{LORA_SCALES: [0.8, 1.0]}` makes `lora_0_scale` and `lora_1_scale`); a family of
    `FAMILIES` left out has no members, and its addresses are refused with a sentence.
    """

    def __init__(
        self,
        initial: Mapping[str, object] | None = None,
        *,
        families: Mapping[ParamFamily, Sequence[object]] | None = None,
    ) -> None:
        families = {**dict.fromkeys(FAMILIES, ()), **(families or {})}
        members = [param for family, starts in families.items() for param in family.members(starts)]
        self._params: Mapping[str, Param] = MappingProxyType(
            {p.name: p for p in (*PARAMS, *members)}
        )
        self._by_address: Mapping[str, Param] = MappingProxyType(
            {p.address: p for p in self._params.values()}
        )
        self._families = {family: len(starts) for family, starts in families.items()}
        values = {p.name: p.default for p in self._params.values()}
        if initial:
            values.update(self._validated(initial))
            check_together(values, initial)
        self._lock = threading.Lock()
        self._snapshot = Snapshot(
            values=MappingProxyType(values),
            version=0,
            changed_at=MappingProxyType(dict.fromkeys(self._params, 0)),
        )

    @property
    def version(self) -> int:
        """The version of the latest change; 0 until the first one."""
        return self._snapshot.version

    @property
    def params(self) -> tuple[Param, ...]:
        """Every parameter this store holds: the schema's, then the families' members."""
        return tuple(self._params.values())

    def param_at(self, address: str) -> Param | None:
        """The parameter with OSC address `address`, or None."""
        return self._by_address.get(address)

    def find(self, text: str) -> Param | None:
        """The parameter `text` names: a name, an alias, an address, or that without `/sd/`."""
        found = find_param(text) or self._params.get(text) or self._by_address.get(text)
        if found is None and not text.startswith("/"):
            found = self._by_address.get("/sd/" + text)
        return found

    def refusal(self, address: str) -> ParamError | None:
        """Why `address` is refused if it names a member of a family that was not loaded."""
        for family, count in self._families.items():
            error = family.refusal(address, count)
            if error is not None:
                return error
        return None

    def get(self, name: str) -> Value:
        """Return the current value of parameter `name`."""
        if name not in self._params:
            raise self._unknown(name)
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
        validated = self._validated(changes)
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

    def _unknown(self, name: str) -> ParamError:
        return ParamError(
            name,
            f"unknown parameter {name!r}; use one of " + ", ".join(self._params) + ".",
        )

    def _validated(self, changes: Mapping[str, object]) -> dict[str, Value]:
        validated: dict[str, Value] = {}
        for name, value in changes.items():
            param = self._params.get(name)
            if param is None:
                raise self._unknown(name)
            validated[name] = param.validate(value)
        return validated
