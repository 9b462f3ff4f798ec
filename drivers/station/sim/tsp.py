"""A TSP instrument engine: every program message is a Lua chunk run by a real Lua runtime
(lupa), with the instrument's objects exposed as Lua tables whose attributes and functions
are backed by Python (reads, writes with range checks, actions); ``print`` sends a reply
line; Lua syntax and runtime errors and refused settings go to the instrument's error
queue as a 2600B or 707B reports them (Reference Manuals, "Error and status messages")."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from lupa import LuaError, LuaRuntime, LuaSyntaxError, lua_type

QUEUE_SIZE = 30  # ASSUMED (the manuals give the queue depth per model)
SANDBOX = """
python = nil; os = nil; io = nil; require = nil; dofile = nil; loadfile = nil
package = nil; debug = nil; collectgarbage = nil
function __wrap(get, set)
  return setmetatable({}, {__index = function(_, k) return get(k) end,
                           __newindex = function(_, k, v) set(k, v) end})
end
"""


class TspError(Exception):
    """Raised by an object's setter or action: the chunk stops, (code, message) is queued."""

    def __init__(self, code: int, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}, {message}")


class LuaObject:
    """A Python-backed TSP object: ``attrs`` maps names to (getter, setter or None);
    ``consts`` are read-only values (enums, functions, sub-objects)."""

    def __init__(self, engine: TspInstrument, attrs: dict[str, tuple[Callable, Callable | None]],
                 consts: dict[str, object] | None = None):
        self.attrs = attrs
        self.consts = {k: engine.function(v) if _python_callable(v) else v
                       for k, v in (consts or {}).items()}
        self.proxy = engine.wrap(self)

    def get(self, key: str) -> object:
        if key in self.consts:
            value = self.consts[key]
            return value.proxy if isinstance(value, LuaObject) else value
        if key in self.attrs:
            return self.attrs[key][0]()
        return None  # Lua: indexing a missing field gives nil (calling it then fails)

    def set(self, key: str, value: object) -> None:
        entry = self.attrs.get(key)
        if entry is None or entry[1] is None:
            raise TspError(-286, f"TSP Runtime error: attribute {key!r} is read-only or "
                                 "does not exist")
        entry[1](value)


def _python_callable(value: object) -> bool:
    return callable(value) and lua_type(value) is None and not isinstance(value, LuaObject)


def number(value: object, lo: float, hi: float, what: str) -> float:
    """A numeric attribute value within [lo, hi] (else the 2600B's parameter errors)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TspError(-286, f"TSP Runtime error: {what} needs a number")
    if value != value or value > hi:
        raise TspError(1101, f"Parameter too big: {what} {value} > {hi}")
    if value < lo:
        raise TspError(1102, f"Parameter too small: {what} {value} < {lo}")
    return float(value)


class TspInstrument:
    """Runs program messages as Lua chunks; subclasses build their objects in ``build``."""

    model = "TSP"
    idn = "Keithley Instruments Inc.,Model TSP,SIM,0"

    def __init__(self) -> None:
        self.errors: deque[tuple[int, str]] = deque()
        self.log: list[str] = []
        self.refused: list[tuple[str, int]] = []
        self._out: list[str] = []
        self._refs: list[Callable] = []
        self.lua = LuaRuntime(register_eval=False, register_builtins=False,
                              unpack_returned_tuples=True)
        self.lua.execute(SANDBOX)
        self._wrap = self.lua.globals()["__wrap"]
        self._closure = self.lua.eval("function(f) return function(...) return f(...) end end")
        g = self.lua.globals()
        g.print = self.function(self._print)
        g.waitcomplete = self.function(lambda *a: None)
        g.reset = self.function(lambda *a: self.reset())
        g.errorqueue = LuaObject(self, {"count": (lambda: len(self.errors), None)},
                                 {"next": self._next, "clear": self.errors.clear}).proxy
        g.localnode = LuaObject(self, {"model": (lambda: self.model, None)}).proxy
        self.build()
        self.reset()

    def function(self, fn: Callable) -> object:
        """A Lua function calling ``fn``."""
        return self._closure(*self.keep(fn))

    def wrap(self, obj: LuaObject) -> object:
        return self._wrap(*self.keep(obj.get, obj.set))

    def keep(self, *fns: Callable) -> tuple[Callable, ...]:
        """Hold a reference to every callable handed to Lua: lupa maps Python objects by
        identity, so a collected bound method's id reused by another would call the wrong
        function."""
        self._refs.extend(fns)
        return fns

    def build(self) -> None:
        """Create the instrument's objects in ``self.lua.globals()``."""

    def reset(self) -> None:
        """reset(): the power-on settings."""

    def table(self, *values: object) -> object:
        return self.lua.table(*values)

    def _print(self, *args: object) -> None:
        self._out.append("\t".join(self._fmt(a) for a in args))

    @staticmethod
    def _fmt(value: object) -> str:
        if value is None:
            return "nil"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:.9e}"
        return str(value)

    def _next(self) -> tuple[int, str, int, int]:
        code, message = self.errors.popleft() if self.errors else (0, "Queue Is Empty")
        return code, message, 0 if code == 0 else 2, 0

    def push_error(self, code: int, message: str) -> None:
        if len(self.errors) >= QUEUE_SIZE:
            self.errors.pop()
            code, message = -350, "Queue overflow"
        self.errors.append((code, message))

    def message(self, line: str) -> str | None:
        """Run one chunk; its printed lines are the reply (None if it printed nothing)."""
        self._out = []
        text = line.strip()
        if text == "*IDN?":  # TSP instruments answer the IEEE 488.2 identification too
            return self.idn
        if text in ("*RST", "*CLS"):
            self.reset() if text == "*RST" else self.errors.clear()
            self.log.append(text)
            return None
        try:
            self.lua.execute(text)
        except TspError as exc:
            self._refuse(text, exc.code, exc.message)
        except LuaSyntaxError as exc:
            self._refuse(text, -285, f"TSP Syntax error at line 1: {_first(exc)}")
        except LuaError as exc:
            self._refuse(text, -286, f"TSP Runtime error at line 1: {_first(exc)}")
        else:
            self.log.append(text)
        return "\n".join(self._out) if self._out else None

    def _refuse(self, text: str, code: int, message: str) -> None:
        self.refused.append((text, code))
        self.push_error(code, message)


def _first(exc: Exception) -> str:
    return str(exc).splitlines()[0].replace('[string "<python>"]:1: ', "")
