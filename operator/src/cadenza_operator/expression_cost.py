"""What one CEL expression may cost: a static estimate at validation, a meter at evaluation.

CEL has no loops, so an expression's work is bounded by its comprehensions (the macros
`all`, `exists`, `exists_one`, `map` and `filter`) and by the sizes of the lists they run
over; nesting them multiplies: seven nested `.map()` over a 10-item list are 10^7
iterations, which kept an engine busy for tens of seconds and took a gigabyte. Kubernetes
bounds the CEL of CRD validation rules the same two ways: an estimate from the expression
alone when the rule is written, and a budget counted while it runs.

`common-expression-language` (the Rust evaluator Cadenza uses) has neither a cost limit
nor a way to interrupt an evaluation, and exposes no syntax tree. So this module reads
the expression's tokens itself, which is enough to find every comprehension, its body and
what it iterates over:

* `static_cost` estimates the iterations of one evaluation: each comprehension costs the
  size of its range times (1 + what its body costs); a list literal's size is known, any
  other range counts as `UNKNOWN_LIST_SIZE` items.
* `instrument` rewrites the expression so that each comprehension step first calls a
  meter (`[meter(), body][1]`, which still yields the body). The meter counts the steps
  and raises once they pass `MAX_EXPRESSION_COST`, which aborts the evaluation inside the
  Rust code: the cost of data the estimate could not see is stopped, not just reported.

The unit is the same for both (comprehension iterations), so an expression accepted at
validation fails at evaluation only when its data is larger than the estimate assumed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

MAX_EXPRESSION_LENGTH = 4096
"""Characters in one expression. The Rust evaluator recurses over the syntax tree: a
40,000-character chain of `+` overflows its stack and kills the process, which no
exception handler can catch."""

MAX_EXPRESSION_COST = 100_000
"""Comprehension iterations one evaluation may take, estimated at validation and metered
at evaluation: about half a second of an engine's time in the worst case."""

UNKNOWN_LIST_SIZE = 100
"""Items the static estimate assumes for a list or map it cannot see (a variable, a
step output): two comprehensions over such lists may nest, three may not."""

METER = "__cadenza_meter"
"""The function an instrumented expression calls once per comprehension step. Users
cannot shadow it: expressions may only name Cadenza's variables."""

_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_ITERABLE_RESULT = frozenset({"map", "filter"})  # as long as their range, at most

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|//[^\n]*)
  | (?P<raw>[bB]?[rR][bB]?(?:'''.*?'''|\"\"\".*?\"\"\"|'[^'\n]*'|"[^"\n]*"))
  | (?P<string>[bB]?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"
                    |'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"))
  | (?P<number>0[xX][0-9a-fA-F]+[uU]?|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?[uU]?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||.)
    """,
    re.X | re.S,
)
_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}


@dataclass(frozen=True)
class _Token:
    kind: str  # string | number | ident | op
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class _Macro:
    name: str
    dot: int  # token index of the `.` before the macro's name
    open: int  # token index of its `(`
    close: int  # token index of its `)`
    body: tuple[int, int]  # token indexes of the argument evaluated once per iteration
    receiver: int  # token index where the expression it iterates over starts


def _tokens(source: str) -> list[_Token]:
    out = []
    for match in _TOKEN.finditer(source):
        kind = match.lastgroup or "op"
        if kind == "space":
            continue
        out.append(_Token("string" if kind == "raw" else kind, match.group(), match.start(), match.end()))
    return out


def _pairs(tokens: list[_Token]) -> dict[int, int]:
    """Matching brackets, both ways: index of `(` -> index of `)` and back."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for i, tok in enumerate(tokens):
        if tok.kind != "op":
            continue
        if tok.text in _OPEN:
            stack.append(i)
        elif tok.text in _CLOSE and stack and tokens[stack[-1]].text == _CLOSE[tok.text]:
            j = stack.pop()
            pairs[i], pairs[j] = j, i
    return pairs


def _ends_operand(tok: _Token) -> bool:
    return tok.kind in ("ident", "number", "string") or tok.text in (")", "]", "}")


def _receiver_start(tokens: list[_Token], pairs: dict[int, int], last: int) -> int:
    """Where the operand ending at token `last` starts: a primary followed by selections,
    calls and indexes (`a.b(c)[0]`); member access binds tighter than any operator."""
    i = last
    while i >= 0:
        tok = tokens[i]
        if tok.text in _CLOSE and i in pairs:
            start = pairs[i]
            before = tokens[start - 1] if start > 0 else None
            if tok.text == ")" and before is not None and before.kind == "ident":
                i = start - 1  # a call: continue from the function's name
                continue
            if tok.text in ("]", "}") and before is not None and _ends_operand(before):
                i = start - 1  # an index `x[0]` or a message `Type{...}`
                continue
            i = start  # a parenthesised expression, a list or a map literal
        if i >= 2 and tokens[i - 1].text == "." and _ends_operand(tokens[i - 2]):
            i -= 2  # `x.name`: continue with what the name is selected from
            continue
        if i >= 1 and tokens[i - 1].text == ".":
            i -= 1  # a leading dot: `.name` names a root variable
        return i
    return 0


def _macros(tokens: list[_Token], pairs: dict[int, int]) -> list[_Macro]:
    found = []
    for i in range(1, len(tokens) - 4):
        name, paren = tokens[i], tokens[i + 1]
        if not (
            tokens[i - 1].text == "."
            and name.kind == "ident"
            and name.text in _MACROS
            and paren.text == "("
            and tokens[i + 2].kind == "ident"
            and tokens[i + 3].text == ","
            and i + 1 in pairs
        ):
            continue
        close = pairs[i + 1]
        # The argument evaluated for every item: the body (the predicate, for the
        # three-argument map), from after `var,` to the next comma at this level or `)`.
        start = end = i + 4
        while end < close:
            if tokens[end].text in _OPEN and end in pairs:
                end = pairs[end] + 1
            elif tokens[end].text == ",":
                break
            else:
                end += 1
        if end == start or i < 2:
            continue
        receiver = _receiver_start(tokens, pairs, i - 2)
        found.append(_Macro(name.text, i - 1, i + 1, close, (start, end), receiver))
    return found


def _elements(tokens: list[_Token], pairs: dict[int, int], open_: int) -> int:
    """Items of the list (or entries of the map) literal opening at token `open_`."""
    count, seen, i = 0, False, open_ + 1
    while i < pairs[open_]:
        if tokens[i].text == ",":
            count, seen = count + seen, False
        else:
            seen = True
        i = pairs[i] + 1 if tokens[i].text in _OPEN and i in pairs else i + 1
    return count + seen


def static_cost(source: str) -> int:
    """Comprehension iterations one evaluation of `source` is estimated to take."""
    tokens = _tokens(source)
    pairs = _pairs(tokens)
    macros = sorted(_macros(tokens, pairs), key=lambda m: m.dot)
    by_close = {m.close: i for i, m in enumerate(macros)}
    cap = 10 * MAX_EXPRESSION_COST  # seven nested comprehensions are far past any budget

    # What each comprehension iterates over, left to right: a chained one (`x.map(...)
    # .filter(...)`) iterates over the result of one to its left.
    sizes: list[int] = []
    for m in macros:
        first, last = m.receiver, m.dot - 1
        inner = by_close.get(last)
        if tokens[first].text in ("[", "{") and pairs.get(first) == last:
            sizes.append(_elements(tokens, pairs, first))
        elif inner is not None and macros[inner].receiver == first:
            sizes.append(sizes[inner] if macros[inner].name in _ITERABLE_RESULT else 1)
        else:
            sizes.append(UNKNOWN_LIST_SIZE)

    # Each costs its size times (1 + the cost of the comprehensions directly inside its
    # parentheses), computed right to left so that those inside come first.
    parent: list[int | None] = []
    for m in macros:
        around = [i for i, o in enumerate(macros) if o.open < m.dot and m.close < o.close]
        parent.append(max(around, key=lambda i: macros[i].open) if around else None)
    inside = [0] * len(macros)
    total = 0
    for i in reversed(range(len(macros))):
        cost = min(sizes[i] * (1 + inside[i]), cap)
        up = parent[i]
        if up is None:
            total = min(total + cost, cap)
        else:
            inside[up] = min(inside[up] + cost, cap)
    return total


def instrument(source: str) -> str | None:
    """`source` with a call to `METER` in front of every comprehension step, or None
    when it has no comprehension (its cost is then bounded by its length)."""
    tokens = _tokens(source)
    macros = _macros(tokens, _pairs(tokens))
    if not macros:
        return None
    inserts: list[tuple[int, str]] = []
    for m in macros:
        first, last = tokens[m.body[0]], tokens[m.body[1] - 1]
        inserts += [(first.start, f"[{METER}(), "), (last.end, "][1]")]
    out = source
    for offset, text in sorted(inserts, key=lambda ins: ins[0], reverse=True):
        out = out[:offset] + text + out[offset:]
    return out


class CostExceeded(Exception):
    """Raised by the meter inside an evaluation that used up its budget."""


class Meter:
    """Counts one evaluation's comprehension steps; passed to it as the `METER` function."""

    __slots__ = ("exceeded", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.exceeded = False

    def __call__(self) -> bool:
        self.steps += 1
        if self.steps > MAX_EXPRESSION_COST:
            # Raised again at every later step: `||` and `&&` absorb an error of one side,
            # so the evaluation may go on, but each comprehension then stops at once.
            self.exceeded = True
            raise CostExceeded(f"more than {MAX_EXPRESSION_COST} comprehension steps")
        return True


class _QuietMeter(logging.Filter):
    """The CEL library logs every error a Python function raises; the meter's are the
    expected way of stopping an evaluation and are reported as the step's error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return METER not in record.getMessage()


logging.getLogger("cel").addFilter(_QuietMeter())
