"""A recorded stand-in of the TouchDesigner operators the StreamDiffusionBridge component uses.

TouchDesigner cannot run here, so the builder (toe/build_component.py) and the component's glue
(toe/sdb_extension.py and the callbacks DATs) are exercised against this imitation of the part
of TouchDesigner's documented Python API they touch: `COMP.create`, `appendCustomPage` and the
`Page.append*` methods, `Par` values, connectors, `DAT.text` and `DAT.module`, the
`ext0object`/`ext0promote` extension parameters with `initializeExtensions`, the Parameter
Execute and Execute DAT callbacks, the OSC In and Out DATs with `sendOSC` and `onReceiveOSC`,
and Script TOPs with `numpyArray` and `copyNumpyArray`.

Each operator type knows only the built-in parameters TouchDesigner's documentation lists for
it, so a misspelt parameter fails here as it would there. Where TouchDesigner acts, the
stand-in acts for real and records what it did: the OSC Out DAT sends UDP datagrams (encoded
with python-osc) and keeps them in `sent`, the OSC In DAT listens on its port, a Text DAT's
`module` imports sibling DATs by name as TouchDesigner's import does, and `COMP.save` writes a
JSON description of the network where the .tox would go.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import re
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

_CUSTOM_NAME = re.compile(r"[A-Z][a-z0-9]*")

_TOP_COMMON = {
    "outputresolution",
    "resolutionw",
    "resolutionh",
    "resmult",
    "outputaspect",
    "inputfiltertype",
    "fillmode",
    "filtertype",
    "npasses",
    "chanmask",
    "format",
}
_DAT_COMMON = {"language", "extension", "customext", "wordwrap"}
_DAT_FILE = {"file", "syncfile", "loadonstart", "loadonstartpulse", "write", "writepulse"}
_OSC_DAT = {
    "active",
    "protocol",
    "address",
    "port",
    "localaddress",
    "shared",
    "addscope",
    "typetag",
    "splitbundle",
    "splitmessage",
    "bundletimestamp",
    "callbacks",
    "executeloc",
    "fromop",
    "clamp",
    "maxlines",
    "clear",
    "bytes",
}

# Built-in parameters per operator type, from each operator's page in TouchDesigner's docs.
BUILTIN_PARS: dict[str, set[str]] = {
    "baseCOMP": {
        "ext0object",
        "ext0name",
        "ext0promote",
        "reinitextensions",
        "parentshortcut",
        "opshortcut",
        "externaltox",
        "enableexternaltox",
    },
    "textDAT": _DAT_FILE | _DAT_COMMON | {"edit"},
    "parameterexecuteDAT": _DAT_FILE
    | _DAT_COMMON
    | {
        "active",
        "executeloc",
        "fromop",
        "op",
        "pars",
        "valuechange",
        "valueschanged",
        "onpulse",
        "expressionchange",
        "exportchange",
        "enablechange",
        "modechange",
        "custom",
        "builtin",
        "edit",
    },
    "executeDAT": _DAT_FILE
    | _DAT_COMMON
    | {
        "active",
        "executeloc",
        "fromop",
        "start",
        "create",
        "exit",
        "framestart",
        "frameend",
        "playstatechange",
        "devicechange",
        "edit",
    },
    "oscoutDAT": _OSC_DAT | _DAT_COMMON,
    "oscinDAT": _OSC_DAT | _DAT_COMMON,
    "inTOP": _TOP_COMMON,
    "outTOP": _TOP_COMMON,
    "scriptTOP": _TOP_COMMON | {"callbacks", "setuppars", "modoutsidecook"},
    "syphonspoutoutTOP": _TOP_COMMON | {"active", "sendername"},
    "syphonspoutinTOP": _TOP_COMMON | {"usespoutactivesender", "sendername"},
    "switchTOP": _TOP_COMMON | {"index", "blend"},
}

# Built-in parameters start as None (unset) unless TouchDesigner's default matters here.
_BUILTIN_DEFAULTS: dict[str, Any] = {"active": True, "port": 0, "index": 0, "ext0promote": False}


class Par:
    """One parameter: its value and the attributes a custom parameter can have set."""

    def __init__(self, owner: OP, name: str, *, custom: bool, style: str = "") -> None:
        self.owner = owner
        self.name = name
        self.isCustom = custom
        self.style = style
        self.isPulse = style == "Pulse"
        self.label = name
        self.page: Page | None = None
        if custom:
            self._val: Any = "" if style in ("Str", "File", "Menu") else 0
        else:
            self._val = _BUILTIN_DEFAULTS.get(name)
        self.default: Any = self._val
        self.min = self.max = self.normMin = self.normMax = 0
        self.clampMin = self.clampMax = False
        self.readOnly = False
        self.menuNames: list[str] = []
        self.menuLabels: list[str] = []
        self._expr = ""

    @property
    def expr(self) -> str:
        """The expression; setting one puts the parameter in expression mode."""
        return self._expr

    @expr.setter
    def expr(self, text: str) -> None:
        self._expr = text

    @property
    def val(self) -> Any:
        """The parameter's constant value."""
        return self._val

    @val.setter
    def val(self, value: Any) -> None:
        if self.style == "Menu" and self.menuNames and value not in self.menuNames:
            raise ValueError(f"{value!r} is not a menu entry of {self.name}: {self.menuNames}")
        previous, self._val = self._val, value
        if previous != value:
            self.owner.root.parameter_changed(self, previous)

    def eval(self) -> Any:
        """The current value; a toggle evaluates to a bool as in TouchDesigner.

        An expression is evaluated where TouchDesigner evaluates it: `me` is the operator
        owning the parameter and `parent()` its component.
        """
        if self._expr:
            owner = self.owner
            return eval(self._expr, {"me": owner, "parent": lambda: owner.parent_comp})
        return bool(self._val) if self.style == "Toggle" else self._val

    def pulse(self) -> None:
        """Pulse the parameter, as a click on its button does."""
        self.owner.root.parameter_pulsed(self)


class ParCollection:
    """`op.par`: parameters by attribute or item; unknown names raise AttributeError."""

    def __init__(self, owner: OP) -> None:
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_pars", {})

    def _add(self, par: Par) -> None:
        self._pars[par.name] = par

    def __getattr__(self, name: str) -> Par:
        pars = object.__getattribute__(self, "_pars")
        if name not in pars:
            raise AttributeError(f"{self._owner.type} {self._owner.path} has no parameter {name!r}")
        return pars[name]

    def __getitem__(self, name: str) -> Par:
        return self.__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__getattr__(name).val = value


class Page:
    """A custom parameter page; each `append*` returns the tuple of parameters it created."""

    def __init__(self, owner: OP, name: str) -> None:
        self.owner = owner
        self.name = name
        self.pars: list[Par] = []

    def _append(self, style: str, name: str, label: str | None, suffixes=("",)) -> tuple[Par, ...]:
        if not _CUSTOM_NAME.fullmatch(name):
            raise ValueError(
                f"custom parameter name {name!r} must be a capital then lower case letters/digits"
            )
        created = []
        for suffix in suffixes:
            par = Par(self.owner, name + suffix, custom=True, style=style)
            par.label = label or name
            par.page = self
            self.owner.par._add(par)
            self.pars.append(par)
            created.append(par)
        return tuple(created)

    def appendStr(self, name: str, label: str | None = None) -> tuple[Par, ...]:
        return self._append("Str", name, label)

    def appendFile(self, name: str, label: str | None = None) -> tuple[Par, ...]:
        return self._append("File", name, label)

    def appendFloat(self, name: str, label: str | None = None) -> tuple[Par, ...]:
        return self._append("Float", name, label)

    def appendInt(self, name: str, label: str | None = None) -> tuple[Par, ...]:
        return self._append("Int", name, label)

    def appendToggle(self, name: str, label: str | None = None) -> tuple[Par, ...]:
        return self._append("Toggle", name, label)

    def appendPulse(self, name: str, label: str | None = None) -> tuple[Par, ...]:
        return self._append("Pulse", name, label)

    def appendMenu(self, name: str, label: str | None = None) -> tuple[Par, ...]:
        return self._append("Menu", name, label)

    def appendWH(self, name: str, label: str | None = None) -> tuple[Par, ...]:
        return self._append("WH", name, label, suffixes=("w", "h"))


class Connector:
    """An input or output connector; `connect` wires an operator's output to an input."""

    def __init__(self, owner: OP, index: int) -> None:
        self.owner = owner
        self.index = index
        self.source: OP | None = None

    def connect(self, target: OP) -> None:
        self.source = target


class OP:
    """An operator of one of the types in BUILTIN_PARS."""

    def __init__(self, root: Root, parent: COMP | None, op_type: str, name: str) -> None:
        self.root = root
        self.parent_comp = parent
        self.type = op_type
        self.name = name
        self.nodeX = self.nodeY = 0
        self.par = ParCollection(self)
        for par_name in BUILTIN_PARS.get(op_type, ()):
            self.par._add(Par(self, par_name, custom=False))
        self.inputConnectors = [Connector(self, index) for index in range(4)]
        self.valid = True

    @property
    def path(self) -> str:
        """Full path, like /project1/StreamDiffusionBridge/oscout."""
        if self.parent_comp is None:
            return "/"
        return f"{self.parent_comp.path.rstrip('/')}/{self.name}"

    @property
    def inputs(self) -> list[OP]:
        """The operators wired into this one, in input order."""
        return [c.source for c in self.inputConnectors if c.source is not None]

    def destroy(self) -> None:
        self.valid = False
        if self.parent_comp is not None:
            del self.parent_comp.children_by_name[self.name]

    def cook(self, force: bool = False) -> None:
        """Cooking does nothing for most types; Script TOPs override it."""


class DAT(OP):
    """A DAT holding text; `module` runs it as a module whose imports find sibling DATs."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.text = ""
        self._module: types.ModuleType | None = None

    @property
    def module(self) -> types.ModuleType:
        """The DAT's text run as a module named after the DAT (cached, as in TouchDesigner)."""
        if self._module is None:
            self._module = self.root.load_module(self)
        return self._module


class OscOutDAT(DAT):
    """Sends OSC to `address`:`port` from its own socket and records every `sendOSC` call."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sent: list[list[tuple[str, list[Any]]]] = []
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.setblocking(False)

    def sendOSC(self, *addresses_and_values: Any, asBundle: bool = True, **_: Any) -> int:
        pairs = list(zip(addresses_and_values[::2], addresses_and_values[1::2], strict=True))
        messages = [_build(address, list(values)) for address, values in pairs]
        if asBundle:
            bundle = OscBundleBuilder(IMMEDIATELY)
            for message in messages:
                bundle.add_content(message)
            datagrams = [bundle.build().dgram]
        else:
            datagrams = [message.dgram for message in messages]
        target = (self.par.address.eval(), int(self.par.port.eval()))
        for datagram in datagrams:
            self.socket.sendto(datagram, target)
        self.sent.append([(address, list(values)) for address, values in pairs])
        return len(datagrams)


class OscInDAT(DAT):
    """Listens on `port` (rebinding when it changes) and hands messages to its callbacks DAT."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.socket: socket.socket | None = None
        self._bound_port = 0

    def listen(self) -> None:
        port = int(self.par.port.eval())
        if port == self._bound_port:
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", port))
        self.socket.setblocking(False)
        self._bound_port = port


class ScriptTOP(OP):
    """Cooking runs `onCook(scriptOp)` of its callbacks DAT; `copyNumpyArray` keeps the image."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.image: np.ndarray | None = None
        self.cooks = 0

    def cook(self, force: bool = False) -> None:
        callbacks = self.parent_comp.op(self.par.callbacks.eval())
        self.cooks += 1
        callbacks.module.onCook(self)

    def copyNumpyArray(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
            raise ValueError("copyNumpyArray needs shape (h, w, 1 to 4 components)")
        if array.dtype not in (np.uint8, np.uint16, np.float32):
            raise ValueError("copyNumpyArray needs uint8, uint16 or float32 data")
        self.image = array.copy()


class InTOP(OP):
    """The component's input: `image` is what the wired TOP shows, as TouchDesigner gives it.

    `numpyArray(delayed=True)` returns None on its first call and the previous image after,
    as the documentation describes for delayed downloads.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.image: np.ndarray | None = None
        self._pending: np.ndarray | None = None

    def numpyArray(self, delayed: bool = False, writable: bool = False) -> np.ndarray | None:
        if not delayed:
            return None if self.image is None else self.image.copy()
        ready, self._pending = self._pending, None if self.image is None else self.image.copy()
        return ready


class COMP(OP):
    """A component: creates children, holds custom pages, extensions, and saves itself."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.children_by_name: dict[str, OP] = {}
        self.customPages: list[Page] = []
        self.extensions: list[Any] = []
        self.saved_to: Path | None = None

    def create(self, op_type: type, name: str) -> OP:
        type_name = op_type.__name__
        if type_name not in BUILTIN_PARS:
            raise TypeError(f"the stand-in does not know operator type {type_name}")
        kind = _CLASSES.get(type_name, DAT if type_name.endswith("DAT") else OP)
        child = kind(self.root, self, type_name, name)
        self.children_by_name[name] = child
        return child

    def op(self, path: str) -> OP | None:
        """A child by name, `..` for the parent, or an absolute path."""
        if path.startswith("/"):
            return self.root.op(path)
        if path in ("..", "../"):
            return self.parent_comp
        return self.children_by_name.get(path.removeprefix("./"))

    @property
    def children(self) -> list[OP]:
        return list(self.children_by_name.values())

    def appendCustomPage(self, name: str) -> Page:
        page = Page(self, name)
        self.customPages.append(page)
        return page

    def initializeExtensions(self) -> list[Any]:
        """Evaluate `ext0object` with `me` and a relative `op`, as the Extensions page does."""
        expression = self.par.ext0object.eval()
        self.extensions = [eval(expression, {"op": self.op, "me": self})]
        return self.extensions

    def save(self, filepath: str, createFolders: bool = False) -> str:
        self.saved_to = Path(filepath)
        self.saved_to.write_text(json.dumps(self.describe(), indent=1), encoding="utf-8")
        return filepath

    def describe(self) -> dict[str, Any]:
        """The network as plain data: children, wiring, custom parameters."""
        return {
            "children": {
                child.name: {"type": child.type, "inputs": [i.name for i in child.inputs]}
                for child in self.children
            },
            "pages": {
                page.name: [[par.name, par.style, par.eval()] for par in page.pars]
                for page in self.customPages
            },
        }

    def __getattr__(self, name: str) -> Any:
        # Promoted extensions: capitalised members are reachable on the component itself.
        if name[:1].isupper() and bool(self.__dict__.get("par") and self.par.ext0promote.eval()):
            for extension in self.__dict__.get("extensions", []):
                if hasattr(extension, name):
                    return getattr(extension, name)
        raise AttributeError(name)


_CLASSES: dict[str, type[OP]] = {
    "baseCOMP": COMP,
    "oscoutDAT": OscOutDAT,
    "oscinDAT": OscInDAT,
    "scriptTOP": ScriptTOP,
    "inTOP": InTOP,
}


class _DatImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import name` inside a DAT module finds the Text DAT `name` of the same component."""

    def __init__(self, root: Root) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        dat = self.root.importing_comp.op(fullname) if self.root.importing_comp else None
        if isinstance(dat, DAT) and "." not in fullname:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        return self.root.importing_comp.op(spec.name).module

    def exec_module(self, module: types.ModuleType) -> None:
        """The module was already run when `DAT.module` created it."""


class Root:
    """The top of the network (`/`) with `/project1`, and the frame loop that drives it."""

    def __init__(self) -> None:
        self.top = COMP(self, None, "baseCOMP", "")
        self.project = self.top.create(_type("baseCOMP"), "project1")
        self.frame = 0
        self.importing_comp: COMP | None = None
        self._modules: dict[str, types.ModuleType] = {}
        self._stashed: dict[str, types.ModuleType] = {}
        self._importer = _DatImporter(self)

    def op(self, path: str) -> OP | None:
        node: OP | None = self.top
        for part in path.strip("/").split("/"):
            if not isinstance(node, COMP):
                return None
            node = node.children_by_name.get(part)
        return node

    def load_module(self, dat: DAT) -> types.ModuleType:
        """Run a DAT's text as module `dat.name`; TouchDesigner names exist in its globals."""
        comp = dat.parent_comp
        # Modules of the same names imported outside the stand-in must not answer for DATs.
        for sibling in comp.children:
            known = sys.modules.get(sibling.name)
            if known is not None and self._modules.get(sibling.name) is not known:
                self._stashed.setdefault(sibling.name, known)
                del sys.modules[sibling.name]
        module = types.ModuleType(dat.name)
        module.__dict__.update(parent=lambda: comp, op=comp.op, me=dat)
        previous, self.importing_comp = self.importing_comp, comp
        sys.modules[dat.name] = self._modules[dat.name] = module
        if self._importer not in sys.meta_path:
            sys.meta_path.insert(0, self._importer)
        try:
            exec(compile(dat.text, f"{dat.path} (DAT)", "exec", dont_inherit=True), module.__dict__)
        finally:
            self.importing_comp = previous
        return module

    def parameter_changed(self, par: Par, previous: Any) -> None:
        for dat in self._parexecs(par, "valuechange"):
            dat.module.onValueChange(par, previous)

    def parameter_pulsed(self, par: Par) -> None:
        for dat in self._parexecs(par, "onpulse"):
            dat.module.onPulse(par)

    def run_frame(self) -> None:
        """One frame: deliver OSC that arrived, then run every Execute DAT's onFrameStart."""
        self.frame += 1
        for dat in self._all(OscInDAT):
            dat.listen()
            self._deliver(dat, dat.socket)
        for dat in self._all(OscOutDAT):
            self._deliver(dat, dat.socket)
        for dat in self._all(DAT):
            if dat.type == "executeDAT" and dat.par.framestart.eval() and dat.par.active.eval():
                dat.module.onFrameStart(self.frame)

    def run_frames_until(self, condition: Callable[[], bool], frames: int = 300) -> bool:
        """Run frames (at roughly 100 fps) until `condition` holds; return whether it did."""
        for _ in range(frames):
            self.run_frame()
            if condition():
                return True
            time.sleep(0.01)
        return False

    def exit(self) -> None:
        """TouchDesigner quits: every Execute DAT with Exit on gets onExit()."""
        for dat in self._all(DAT):
            if dat.type == "executeDAT" and dat.par.exit.eval():
                dat.module.onExit()

    def close(self) -> None:
        for dat in self._all(OscOutDAT):
            dat.socket.close()
        for dat in self._all(OscInDAT):
            if dat.socket is not None:
                dat.socket.close()
        if self._importer in sys.meta_path:
            sys.meta_path.remove(self._importer)
        for name in self._modules:
            sys.modules.pop(name, None)
        sys.modules.update(self._stashed)

    def _deliver(self, dat: DAT, sock: socket.socket | None) -> None:
        callbacks_name = dat.par.callbacks.eval()
        while sock is not None:
            try:
                data, peer = sock.recvfrom(65535)
            except BlockingIOError:
                return
            if not callbacks_name:
                continue
            callbacks = dat.parent_comp.op(callbacks_name)
            for timed in OscPacket(data).messages:
                message = timed.message
                callbacks.module.onReceiveOSC(
                    dat, 0, str(message), data, 0.0, message.address, tuple(message.params), peer
                )

    def _parexecs(self, par: Par, trigger: str) -> Iterator[DAT]:
        comp = par.owner.parent_comp
        if comp is None:
            return
        for dat in list(self._all(DAT)):
            if dat.type != "parameterexecuteDAT" or not dat.par.active.eval():
                continue
            watched = dat.par.op.eval()
            kind_on = dat.par.custom.eval() if par.isCustom else dat.par.builtin.eval()
            if watched is par.owner and kind_on and dat.par[trigger].eval():
                yield dat

    def _all(self, kind: type[OP]) -> Iterator[Any]:
        pending: list[OP] = [self.top]
        while pending:
            node = pending.pop()
            if isinstance(node, kind):
                yield node
            if isinstance(node, COMP):
                pending.extend(node.children)


def _type(name: str) -> type:
    """An operator type object as the `td` module exposes them (`td.baseCOMP`, ...)."""
    return type(name, (), {})


def _build(address: str, values: list[Any]) -> Any:
    builder = OscMessageBuilder(address=address)
    for value in values:
        builder.add_arg(value)
    return builder.build()


@contextmanager
def touchdesigner() -> Iterator[Root]:
    """Install a stand-in `td` module for the duration; yield its network root."""
    root = Root()
    td = types.ModuleType("td")
    td.op = root.op
    for type_name in BUILTIN_PARS:
        setattr(td, type_name, _type(type_name))
    previous = sys.modules.get("td")
    sys.modules["td"] = td
    try:
        yield root
    finally:
        root.close()
        if previous is None:
            sys.modules.pop("td", None)
        else:
            sys.modules["td"] = previous
