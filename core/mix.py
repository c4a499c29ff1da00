"""Embedding arithmetic for ``!mix NEW = EXPR`` (A1111's embedding-inspector mixer is the anchor).

The expression language::

    expr     := sum (sum)*                 juxtaposition concatenates: <a> <b> has a's vectors then b's
    sum      := product (("+" | "-") product)*
    product  := unary (("*" | "/") unary)*
    unary    := "-" unary | postfix
    postfix  := atom ("[" slice "]")*      python slicing over vectors: [0:2], [1], [-1], [::2]
    atom     := NUMBER | "<" NAME ">" | '"' TEXT '"' | "(" expr ")"

``<name>`` is a loaded embedding, ``"text"`` the token embeddings of that text (one vector per token,
no BOS/EOS), a number a scalar. Vectors are a dict per encoder key (``text_encoder``, or ``clip_l`` and
``clip_g`` for SDXL), so an SDXL pair is mixed per encoder with the same operations. Sums need the same
number of vectors on both sides; scaling multiplies every vector; concatenation costs the sum of the
vectors. ``1*<a>`` is bit-identical to ``<a>`` (float32 times 1.0 is exact).

Errors are :class:`MixError`: the column, what was expected and what was found, with a caret line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch

from sdrepl.core.embedding import MAX_VECTORS
from sdrepl.core.errors import UsageError

#: Longest expression accepted (characters) and deepest nesting: bounded work for any input.
MAX_EXPRESSION = 2000
MAX_DEPTH = 50

Vectors = dict[str, torch.Tensor]
Value = Union[float, Vectors]


class MixError(UsageError):
    """A malformed or impossible mix expression: where, what was expected, what was found."""


@dataclass(frozen=True)
class Token:
    kind: str  # number, name, text, op, end
    text: str
    pos: int


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name><[^<>\s"]+>)
  | (?P<text>"(?:[^"\\]|\\.)*")
  | (?P<op>[-+*/()\[\]:])
""", re.VERBOSE)


def tokenize(source: str) -> list[Token]:
    if len(source) > MAX_EXPRESSION:
        raise MixError(f"the expression is {len(source)} characters long; at most {MAX_EXPRESSION}")
    tokens: list[Token] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            found = source[pos]
            hint = (' (an unterminated "text"?)' if found == '"' else
                    " (an embedding is written <name>)" if found in "<>" else "")
            raise _error(source, pos, 'a term (<name>, "text", a number) or an operator', repr(found) + hint)
        kind = match.lastgroup or ""
        if kind != "space":
            text = match.group()
            if kind == "text":
                text = re.sub(r"\\(.)", r"\1", text[1:-1])
            elif kind == "name":
                text = text[1:-1]
            tokens.append(Token(kind, text, pos))
        pos = match.end()
    tokens.append(Token("end", "", len(source)))
    return tokens


def _error(source: str, pos: int, expected: str, found: str) -> MixError:
    return MixError(f"at column {pos + 1}: expected {expected}, found {found}\n  {source}\n  {' ' * pos}^")


# -- syntax tree --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    kind: str  # number, name, text, neg, binop, concat, slice
    pos: int
    value: object = None
    children: tuple[Node, ...] = ()


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = tokenize(source)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def found(self) -> str:
        return "the end" if self.tok.kind == "end" else repr(self.tok.text if self.tok.kind != "name" else
                                                            f"<{self.tok.text}>")

    def expect(self, op: str, what: str) -> Token:
        if self.tok.kind != "op" or self.tok.text != op:
            raise _error(self.source, self.tok.pos, what, self.found())
        tok = self.tok
        self.i += 1
        return tok

    def starts_atom(self) -> bool:
        t = self.tok
        return t.kind in ("number", "name", "text") or (t.kind == "op" and t.text in "(-")

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(self.source, self.tok.pos, f"at most {MAX_DEPTH} levels of nesting", "deeper")
        parts = [self.sum()]
        while self.starts_atom() and not (self.tok.kind == "op" and self.tok.text == "-"):
            parts.append(self.sum())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else Node("concat", parts[0].pos, children=tuple(parts))

    def sum(self) -> Node:
        node = self.product()
        while self.tok.kind == "op" and self.tok.text in "+-":
            op = self.tok
            self.i += 1
            node = Node("binop", op.pos, op.text, (node, self.product()))
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.tok.kind == "op" and self.tok.text in "*/":
            op = self.tok
            self.i += 1
            node = Node("binop", op.pos, op.text, (node, self.unary()))
        return node

    def unary(self) -> Node:
        if self.tok.kind == "op" and self.tok.text == "-":
            pos = self.tok.pos
            self.i += 1
            return Node("neg", pos, children=(self.unary(),))
        return self.postfix()

    def postfix(self) -> Node:
        node = self.atom()
        while self.tok.kind == "op" and self.tok.text == "[":
            pos = self.tok.pos
            self.i += 1
            node = Node("slice", pos, self.slice_spec(), (node,))
        return node

    def index(self) -> int | None:
        sign = 1
        if self.tok.kind == "op" and self.tok.text == "-":
            sign = -1
            self.i += 1
        if self.tok.kind == "number":
            if not self.tok.text.isdigit():
                raise _error(self.source, self.tok.pos, "a whole number index", repr(self.tok.text))
            value = sign * int(self.tok.text)
            self.i += 1
            return value
        if sign == -1:
            raise _error(self.source, self.tok.pos, "a number after -", self.found())
        return None

    def slice_spec(self) -> tuple[int | None, ...] | int:
        parts: list[int | None] = [self.index()]
        colons = 0
        while self.tok.kind == "op" and self.tok.text == ":" and colons < 2:
            self.i += 1
            colons += 1
            parts.append(self.index())
        self.expect("]", "']' to close the slice (a slice is [start:stop] or [index])")
        if colons == 0:
            if parts[0] is None:
                raise _error(self.source, self.tokens[self.i - 1].pos, "an index or start:stop", "[]")
            return int(parts[0])
        if colons == 2 and parts[2] == 0:
            raise _error(self.source, self.tokens[self.i - 1].pos, "a slice step other than 0", "0")
        return tuple(parts)

    def atom(self) -> Node:
        t = self.tok
        if t.kind == "number":
            self.i += 1
            return Node("number", t.pos, float(t.text))
        if t.kind in ("name", "text"):
            self.i += 1
            return Node(t.kind, t.pos, t.text)
        if t.kind == "op" and t.text == "(":
            self.i += 1
            inner = self.expr()
            self.expect(")", f"')' to close the '(' at column {t.pos + 1}")
            return inner
        raise _error(self.source, t.pos, 'a term (<name>, "text", a number or "(")', self.found())


def parse(source: str) -> Node:
    """The syntax tree of ``source``, or a :class:`MixError` saying where and what was expected."""
    if not source.strip():
        raise MixError('an empty expression; e.g. 0.5*<a> + 0.5*<b>, <a> <b>, <a>[0:2], "red fox"')
    parser = _Parser(source)
    node = parser.expr()
    if parser.tok.kind != "end":
        raise _error(source, parser.tok.pos, "an operator (+ - * /), a term to concatenate, or the end",
                     parser.found())
    return node


def names(node: Node) -> list[str]:
    """The embedding names an expression uses, in order of first use."""
    found: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop(0)
        if n.kind == "name" and n.value not in found:
            found.append(str(n.value))
        stack[0:0] = list(n.children)
    return found


# -- evaluation ---------------------------------------------------------------------------------------

def evaluate(node: Node, source: str, lookup: Callable[[str], Vectors], encode: Callable[[str], Vectors]) -> Vectors:
    """The vectors ``node`` stands for. ``lookup(name)`` gives an embedding's vectors, ``encode(text)`` a
    text's token embeddings (both per encoder key, ``[N, D]`` float32)."""
    value = _eval(node, source, lookup, encode)
    if isinstance(value, float):
        raise _error(source, node.pos, "vectors (an embedding or text) in the result", "only numbers")
    count = _count(value)
    if count == 0:
        raise _error(source, node.pos, "at least one vector in the result", "none (an empty slice?)")
    if count > MAX_VECTORS:
        raise _error(source, node.pos, f"at most {MAX_VECTORS} vectors in the result", f"{count}")
    if any(not torch.isfinite(t).all() for t in value.values()):
        raise _error(source, node.pos, "finite values", "inf or NaN (a division by a tiny number?)")
    return {k: t.contiguous().clone() for k, t in value.items()}


def _count(vectors: Vectors) -> int:
    return int(next(iter(vectors.values())).shape[0])


def _eval(node: Node, source: str, lookup: Callable[[str], Vectors], encode: Callable[[str], Vectors]) -> Value:
    kind = node.kind
    if kind == "number":
        return float(node.value)  # type: ignore[arg-type]
    if kind == "name":
        return dict(lookup(str(node.value)))
    if kind == "text":
        vectors = encode(str(node.value))
        if _count(vectors) == 0:
            raise _error(source, node.pos, "text with at least one token", f'"{node.value}"')
        return vectors
    args = [_eval(child, source, lookup, encode) for child in node.children]
    if kind == "neg":
        (a,) = args
        return -a if isinstance(a, float) else {k: -t for k, t in a.items()}
    if kind == "slice":
        (a,) = args
        if isinstance(a, float):
            raise _error(source, node.pos, "vectors to slice", "a number")
        spec = node.value
        if isinstance(spec, int):
            n = _count(a)
            if not -n <= spec < n:
                raise _error(source, node.pos, f"an index from {-n} to {n - 1} (the term has {n} vectors)", str(spec))
            return {k: t[spec:spec + 1] if spec != -1 else t[-1:] for k, t in a.items()}
        picks = list(range(_count(a)))[slice(*spec)]  # type: ignore[misc]  (python's rules, negative steps too)
        index = torch.tensor(picks, dtype=torch.long)
        return {k: t.index_select(0, index) for k, t in a.items()}
    if kind == "concat":
        vectors = [a for a in args if not isinstance(a, float)]
        if len(vectors) != len(args):
            bad = next(child for child, a in zip(node.children, args, strict=True) if isinstance(a, float))
            raise _error(source, bad.pos, "vectors to concatenate (a number scales: 0.5*<a>)", "a lone number")
        _same_keys(vectors, node, source)
        return {k: torch.cat([v[k] for v in vectors]) for k in vectors[0]}
    a, b = args
    op = str(node.value)
    if isinstance(a, float) and isinstance(b, float):
        if op == "/" and b == 0:
            raise _error(source, node.pos, "a divisor other than 0", "0")
        return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0.0}[op]
    if op == "*":
        if isinstance(a, float):
            return {k: t * a for k, t in b.items()}  # type: ignore[union-attr]
        if isinstance(b, float):
            return {k: t * b for k, t in a.items()}
        raise _error(source, node.pos, "a number on one side of * (vectors are scaled, not multiplied)", "vectors")
    if op == "/":
        if not isinstance(b, float):
            raise _error(source, node.pos, "a number after / ", "vectors")
        if b == 0:
            raise _error(source, node.pos, "a divisor other than 0", "0")
        return {k: t / b for k, t in a.items()}  # type: ignore[union-attr]
    if isinstance(a, float) or isinstance(b, float):
        raise _error(source, node.pos, f"vectors on both sides of {op} (a number scales: 0.5*<a>)", "a number")
    _same_keys([a, b], node, source)
    if _count(a) != _count(b):
        raise _error(source, node.pos, f"the same number of vectors on both sides of {op} (slice one: <a>[0:1])",
                     f"{_count(a)} and {_count(b)}")
    return {k: (a[k] + b[k]) if op == "+" else (a[k] - b[k]) for k in a}


def _same_keys(values: list[Vectors], node: Node, source: str) -> None:
    keys = [sorted(v) for v in values]
    if any(k != keys[0] for k in keys):
        raise _error(source, node.pos, "terms for the same text encoders", " and ".join("+".join(k) for k in keys))
    for key in keys[0]:
        widths = {int(v[key].shape[1]) for v in values}
        if len(widths) > 1:
            raise _error(source, node.pos, f"terms of the same width ({key})", " and ".join(map(str, sorted(widths))))
