"""A SCPI instrument engine (IEEE 488.2 / SCPI-1999): the header tree with short and long
forms, optional nodes and numeric suffixes; ``;`` chains with the path rule (a header without
a leading colon continues at the previous command's node); common commands; typed parameters;
one response message per program message; and the FIFO error queue with the standard codes.
Instrument models register their headers and handlers on it."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

QUEUE_SIZE = 30  # SCPI-1999 Vol. 2, 21.8: at least 2 (30 ASSUMED for both instruments)

# SCPI-1999 Vol. 2, 21.8.9 standard error numbers
ERRORS = {
    -100: "Command error", -101: "Invalid character", -102: "Syntax error",
    -104: "Data type error", -108: "Parameter not allowed", -109: "Missing parameter",
    -113: "Undefined header", -114: "Header suffix out of range",
    -120: "Numeric data error", -200: "Execution error", -221: "Settings conflict",
    -222: "Data out of range", -224: "Illegal parameter value",
    -350: "Queue overflow", -410: "Query INTERRUPTED", -420: "Query UNTERMINATED",
}


class ScpiError(Exception):
    """Raised by a handler: the command is refused and (code, detail) queued."""

    def __init__(self, code: int, detail: str = ""):
        self.code = code
        self.detail = detail
        super().__init__(f"{code},{ERRORS.get(code, 'Error')}{'; ' + detail if detail else ''}")


@dataclass(frozen=True)
class _Node:
    short: str
    long: str
    optional: bool
    suffix: bool  # takes a numeric suffix (channel), e.g. SOUR2


def _compile(pattern: str) -> list[_Node]:
    """':SOURce#[:FUNCtion]:MODE' -> nodes; '#' marks a numeric suffix, [] an optional node."""
    nodes = []
    for opt, body in re.findall(r"(\[?):?([A-Za-z*?#]+)\]?", pattern.replace("[:", "[")):
        suffix = body.endswith("#")
        name = body.rstrip("#")
        short = "".join(ch for ch in name if ch.isupper() or ch in "*?")
        nodes.append(_Node(short.upper(), name.upper(), bool(opt), suffix))
    return nodes


def _match_token(node: _Node, token: str) -> int | None:
    """The suffix (1 when absent) if ``token`` names ``node``, else None."""
    m = re.fullmatch(r"([A-Z*?]+?)(\d*)", token)
    if not m:
        return None
    word, digits = m.group(1), m.group(2)
    if word not in (node.short, node.long):
        return None
    if digits and not node.suffix:
        return None
    return int(digits) if digits else 1


Handler = Callable[["Call"], str | None]


@dataclass
class Call:
    """One parsed command as its handler sees it."""

    header: str
    suffixes: list[int]
    params: list[str]
    query: bool

    @property
    def suffix(self) -> int:
        return self.suffixes[0] if self.suffixes else 1

    def need(self, n: int) -> None:
        if len(self.params) < n:
            raise ScpiError(-109)
        if len(self.params) > n:
            raise ScpiError(-108)

    def number(self, i: int = 0, lo: float | None = None, hi: float | None = None,
               default: float | None = None) -> float:
        text = self.params[i].strip().upper()
        special = {"MIN": lo, "MINIMUM": lo, "MAX": hi, "MAXIMUM": hi, "DEF": default,
                   "DEFAULT": default}
        if text in special and special[text] is not None:
            return float(special[text])
        try:
            value = float(text)
        except ValueError:
            raise ScpiError(-104, f"numeric parameter expected, got {self.params[i]!r}") \
                from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ScpiError(-120)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ScpiError(-222, f"{value:g} outside {lo:g} to {hi:g}")
        return value

    def integer(self, i: int = 0, lo: int | None = None, hi: int | None = None) -> int:
        value = self.number(i, lo, hi)
        return int(round(value))

    def boolean(self, i: int = 0) -> bool:
        text = self.params[i].strip().upper()
        if text in ("ON", "1"):
            return True
        if text in ("OFF", "0"):
            return False
        raise ScpiError(-224, f"boolean expected, got {self.params[i]!r}")

    def choice(self, i: int, options: dict[str, str]) -> str:
        """Character data by short or long form: options {'VOLTage': 'VOLT', ...}."""
        text = self.params[i].strip().strip('"').strip("'").upper()
        for spelled, value in options.items():
            short = "".join(ch for ch in spelled if ch.isupper())
            if text in (short, spelled.upper()):
                return value
        raise ScpiError(-224, f"{self.params[i]!r} is not one of {', '.join(options)}")


def _split(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside quotes and parentheses."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


class ScpiInstrument:
    """An instrument behind a SCPI command tree; :meth:`message` runs one program message
    (a line) and returns the response message (None when it had no query)."""

    idn = "analog-hil,scpi-instrument,0,0"

    def __init__(self) -> None:
        self._tree: list[tuple[list[_Node], bool, Handler]] = []
        # resolved headers: a station sends the same few thousand times a second
        self._resolved: dict[tuple[tuple[str, ...], bool],
                             tuple[Handler, list[int]] | None] = {}
        self.errors: deque[tuple[int, str]] = deque()
        self.log: list[str] = []  # every command header accepted (tests replay them)
        self.refused: list[tuple[str, int]] = []
        self.add("*IDN?", lambda c: self.idn)
        self.add("*RST", lambda c: self.reset())
        self.add("*CLS", lambda c: self.errors.clear())
        self.add("*OPC?", lambda c: "1")
        self.add("*OPC", lambda c: None)
        self.add("*WAI", lambda c: None)
        self.add(":SYSTem:ERRor[:NEXT]?", lambda c: self._next_error())
        self.add(":SYSTem:ERRor:COUNt?", lambda c: str(len(self.errors)))

    def reset(self) -> None:
        """*RST: the instrument's power-on settings (subclasses extend)."""

    def add(self, pattern: str, handler: Handler) -> None:
        query = pattern.endswith("?")
        self._tree.append((_compile(pattern.rstrip("?")), query, handler))
        self._resolved.clear()

    def push_error(self, code: int, detail: str = "") -> None:
        text = ERRORS.get(code, "Error") + (f"; {detail}" if detail else "")
        if len(self.errors) >= QUEUE_SIZE:  # the last entry becomes -350 (SCPI 21.8)
            self.errors.pop()
            self.errors.append((-350, ERRORS[-350]))
            return
        self.errors.append((code, text))

    def _next_error(self) -> str:
        code, text = self.errors.popleft() if self.errors else (0, "No error")
        return f'{code:+d},"{text}"'

    # -- parsing -----------------------------------------------------------------------------
    def _resolve(self, tokens: list[str], query: bool) -> tuple[Handler, list[int]] | None:
        key = (tuple(tokens), query)
        if key not in self._resolved:
            if len(self._resolved) >= 4096:  # bounded: a client may send any header
                self._resolved.clear()
            self._resolved[key] = self._search(tokens, query)
        return self._resolved[key]

    def _search(self, tokens: list[str], query: bool) -> tuple[Handler, list[int]] | None:
        for nodes, is_query, handler in self._tree:
            if is_query != query:
                continue
            suffixes = self._walk(nodes, tokens)
            if suffixes is not None:
                return handler, suffixes
        return None

    def _walk(self, nodes: list[_Node], tokens: list[str]) -> list[int] | None:
        if not nodes:
            return [] if not tokens else None
        node = nodes[0]
        if tokens:
            got = _match_token(node, tokens[0])
            if got is not None:
                rest = self._walk(nodes[1:], tokens[1:])
                if rest is not None:
                    return ([got] if node.suffix else []) + rest
        if node.optional:
            rest = self._walk(nodes[1:], tokens)
            if rest is not None:
                return ([1] if node.suffix else []) + rest
        return None

    def message(self, line: str) -> str | None:
        """Run one program message; a failing command is refused (error queued) and the
        message's remaining commands still run, as SCPI parsers do."""
        replies: list[str] = []
        path: list[str] = []
        for unit in _split(line.strip(), ";"):
            unit = unit.strip()
            if not unit:
                continue
            head, _, rest = unit.partition(" ")
            head = head.strip()
            query = head.endswith("?")
            bare = head.rstrip("?")
            if bare.startswith("*"):
                tokens, absolute = [bare.upper()], True
            else:
                absolute = bare.startswith(":")
                tokens = [t.upper() for t in bare.strip(":").split(":")]
                if not absolute and path:
                    tokens = path + tokens
            if not all(re.fullmatch(r"[A-Z*][A-Z0-9]*", t) for t in tokens):
                self._refuse(unit, -102, f"bad header {head!r}")
                continue
            params = [p.strip() for p in _split(rest, ",")] if rest.strip() else []
            found = self._resolve(tokens, query)
            if found is None:
                self._refuse(unit, -113, head)
                continue
            handler, suffixes = found
            if not bare.startswith("*"):
                path = tokens[:-1]
            try:
                reply = handler(Call(":".join(tokens), suffixes, params, query))
            except ScpiError as exc:
                self._refuse(unit, exc.code, exc.detail)
                continue
            self.log.append(unit)
            if query:
                replies.append("" if reply is None else str(reply))
        return ";".join(replies) if replies else None

    def _refuse(self, unit: str, code: int, detail: str) -> None:
        self.refused.append((unit, code))
        self.push_error(code, detail)
