"""Composition as data: what runs when several adapters are active.

``set_active(model, "a")`` runs one adapter; a list ``["a", "b"]`` is shorthand for ``Stack("a", "b")``.

- ``Stack(a, b, ...)``: apply the children in order. Series units see the output of the previous
  child; parallel units add their change (computed from the module input); weight deltas add up.
- ``Average(a, b, ..., weights=...)``: a weighted sum of the children's *changes*:
  ``h + sum_i w_i * (child_i(h) - h)``; weight deltas combine the same way (``W + sum_i w_i dW_i``).
  With weights summing to 1 this is the weighted mean of the children's outputs. Default: uniform.
- ``Mixture(a, b, ..., gate="g")``: MixDA's mixture of adapters: ``h + sum_i g_i(h) * (child_i(h) - h)``
  where ``g(h) = softmax(W h / T)`` is a learned gate per adapter point, stored as adapter ``g``
  (:func:`mmadapters.add_mixture_gate`). Children must not edit weights (their outputs are mixed per token).

What may nest in what is the table ``ALLOWED_NESTINGS`` (AdapterHub's approach), checked in one place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class Composition:
    children: tuple[str | Composition, ...]

    def __init__(self, *children: str | Composition):
        if len(children) == 1 and isinstance(children[0], list | tuple):
            children = tuple(children[0])
        if not children:
            raise ValueError(f"{type(self).__name__}() needs at least one adapter")
        self.children = tuple(children)

    def names(self) -> list[str]:
        out: list[str] = []
        for child in self.children:
            out.extend([child] if isinstance(child, str) else child.names())
        return out

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"

    def to_dict(self) -> dict:
        return {"type": type(self).__name__,
                "children": [c if isinstance(c, str) else c.to_dict() for c in self.children]}


class Stack(Composition):
    pass


class Average(Composition):
    def __init__(self, *children: str | Composition, weights: Sequence[float] | None = None):
        super().__init__(*children)
        if weights is None:
            weights = [1.0 / len(self.children)] * len(self.children)
        weights = [float(w) for w in weights]
        if len(weights) != len(self.children):
            raise ValueError(f"Average: {len(self.children)} adapters but {len(weights)} weights")
        self.weights = tuple(weights)

    def __repr__(self) -> str:
        return f"Average({', '.join(map(repr, self.children))}, weights={list(self.weights)})"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "weights": list(self.weights)}


class Mixture(Composition):
    def __init__(self, *children: str | Composition, gate: str):
        super().__init__(*children)
        if not isinstance(gate, str) or not gate:
            raise ValueError(f"Mixture: gate must be the name of a mixture-gate adapter, got {gate!r}")
        self.gate = gate

    def names(self) -> list[str]:
        return [*super().names(), self.gate]

    def __hash__(self) -> int:
        return hash(("Mixture", self.children, self.gate))

    def __repr__(self) -> str:
        return f"Mixture({', '.join(map(repr, self.children))}, gate={self.gate!r})"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "gate": self.gate}


# Which compositions may appear as children of which; a plain adapter name is always allowed.
ALLOWED_NESTINGS: dict[type[Composition], tuple[type[Composition], ...]] = {
    Stack: (Stack, Average, Mixture),
    Average: (Stack, Average),
    Mixture: (Stack,),
}


def parse_composition(spec: str | Sequence | Composition | None) -> str | Composition | None:
    """Normalize what users pass to ``set_active`` and validate nesting against the table."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, list | tuple):
        if len(spec) == 0:
            return None
        spec = spec[0] if len(spec) == 1 else Stack(*spec)
        if isinstance(spec, str):
            return spec
    if not isinstance(spec, Composition):
        raise TypeError(f"active adapters: expected a name, a list of names or a composition, got {spec!r}")
    _validate(spec)
    names = spec.names()
    if len(set(names)) != len(names):
        raise ValueError(f"{spec!r}: an adapter appears twice")
    return spec


def _validate(comp: Composition) -> None:
    for child in comp.children:
        if isinstance(child, str):
            continue
        if not isinstance(child, Composition):
            raise TypeError(f"{type(comp).__name__}: children must be adapter names or compositions, got {child!r}")
        if type(child) not in ALLOWED_NESTINGS.get(type(comp), ()):
            raise ValueError(f"{type(child).__name__} may not be nested inside {type(comp).__name__}")
        _validate(child)


def active_names(spec: str | Composition | None) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else spec.names()


def weighted_leaves(spec: str | Composition, coef: float = 1.0) -> Iterator[tuple[str, float]]:
    """(adapter, coefficient) pairs for combining linear quantities (weight deltas) over a composition."""
    if isinstance(spec, str):
        yield spec, coef
    elif isinstance(spec, Average):
        for child, w in zip(spec.children, spec.weights, strict=True):
            yield from weighted_leaves(child, coef * w)
    elif isinstance(spec, Mixture):
        return  # input-dependent mixing has no weight-space form; the wrapper rejects weight units in it
    else:
        for child in spec.children:
            yield from weighted_leaves(child, coef)


def from_dict(data: str | dict | None) -> str | Composition | None:
    if data is None or isinstance(data, str):
        return data
    kinds = {"Stack": Stack, "Average": Average, "Mixture": Mixture}
    cls = kinds[data["type"]]
    children = [from_dict(c) for c in data["children"]]
    if cls is Average:
        return Average(*children, weights=data.get("weights"))
    return Mixture(*children, gate=data["gate"]) if cls is Mixture else cls(*children)
