"""Form decoding as stripe-python encodes it (`a[b]=1`, `items[0][price]=x`, `expand[0]=y`,
`expand[]=y`) and strict validation against a per-endpoint schema, so that an unknown name fails
as Stripe fails it: 400 "Received unknown parameter: X".
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from billing.emulator.errors import StripeError, invalid


def parse_form(text: str) -> dict[str, Any]:
    """Nested dicts only; list-ness is decided by the schema (digit or empty keys)."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        if "[" not in key:
            _assign(root, key, value, key)
            continue
        first = key.index("[")
        if not key.endswith("]") or first == 0:
            raise invalid(f"Invalid parameter name: {key}", param=key)
        parts = [key[:first], *key[first + 1 : -1].split("][")]
        node = root
        for depth, part in enumerate(parts[:-1]):
            if part == "":
                part = str(len(node))
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise invalid(f"Invalid parameter: {key}", param=_name(parts[: depth + 1]))
            node = child
        last = parts[-1]
        if last == "":
            last = str(len(node))
        _assign(node, last, value, key)
    return root


def _assign(node: dict[str, Any], key: str, value: str, full: str) -> None:
    if isinstance(node.get(key), dict):
        raise invalid(f"Invalid parameter: {full}", param=full)
    node[key] = value


def _name(parts: list[str]) -> str:
    return parts[0] + "".join(f"[{p}]" for p in parts[1:])


class Spec:
    def clean(self, value: Any, name: str) -> Any:
        raise NotImplementedError


class Str(Spec):
    def __init__(self, max_len: int = 5000, choices: tuple[str, ...] | None = None) -> None:
        self.max_len = max_len
        self.choices = choices

    def clean(self, value: Any, name: str) -> Any:
        if not isinstance(value, str):
            raise invalid(f"Invalid string: {name} must be a string", param=name)
        if len(value) > self.max_len:
            raise invalid(
                f"Invalid string: {name} must be at most {self.max_len} characters", param=name
            )
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(f"`{c}`" for c in self.choices)
            raise invalid(f"Invalid {name}: must be one of {allowed}", param=name)
        return value


class Int(Spec):
    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def clean(self, value: Any, name: str) -> Any:
        if value == "":
            return None
        if not isinstance(value, str) or not value.lstrip("-").isdigit():
            raise invalid(f"Invalid integer: {value}", param=name, code="parameter_invalid_integer")
        number = int(value)
        if self.minimum is not None and number < self.minimum:
            raise invalid(f"Invalid {name}: must be at least {self.minimum}", param=name)
        if self.maximum is not None and number > self.maximum:
            raise invalid(f"Invalid {name}: must be at most {self.maximum}", param=name)
        return number


class Bool(Spec):
    def clean(self, value: Any, name: str) -> Any:
        if value in ("true", "false"):
            return value == "true"
        if value == "":
            return None
        raise invalid(f"Invalid boolean: {value}", param=name)


class Map(Spec):
    """A free string map (metadata, payload). `name=""` means "empty" (unset all on update)."""

    def clean(self, value: Any, name: str) -> Any:
        if value == "":
            return {}
        if not isinstance(value, dict):
            raise invalid(f"Invalid object: {name} must be a hash", param=name)
        for key, item in value.items():
            if not isinstance(item, str):
                raise invalid(f"Invalid string: {name}[{key}]", param=f"{name}[{key}]")
        return dict(value)


class List(Spec):
    def __init__(self, item: Spec, max_items: int = 250) -> None:
        self.item = item
        self.max_items = max_items

    def clean(self, value: Any, name: str) -> Any:
        if value == "":
            return []
        if isinstance(value, str):  # `expand=customer` without brackets: Stripe takes one value
            value = {"0": value}
        if not isinstance(value, dict) or not all(k.isdigit() for k in value):
            raise invalid(f"Invalid array: {name}", param=name)
        if len(value) > self.max_items:
            raise invalid(f"Invalid array: {name} has more than {self.max_items} items", param=name)
        ordered = sorted(value.items(), key=lambda kv: int(kv[0]))
        return [self.item.clean(v, f"{name}[{i}]") for i, (_, v) in enumerate(ordered)]


class Obj(Spec):
    def __init__(self, fields: dict[str, Spec], required: tuple[str, ...] = ()) -> None:
        self.fields = fields
        self.required = required

    def clean(self, value: Any, name: str) -> Any:
        if value == "":
            return None
        if not isinstance(value, dict):
            raise invalid(f"Invalid object: {name} must be a hash", param=name)
        return self.clean_fields(value, name)

    def clean_fields(self, value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, raw in value.items():
            full = f"{prefix}[{key}]" if prefix else key
            spec = self.fields.get(key)
            if spec is None:
                raise StripeError(
                    400,
                    f"Received unknown parameter: {full}",
                    code="parameter_unknown",
                    param=full,
                )
            out[key] = spec.clean(raw, full)
        for key in self.required:
            if out.get(key) is None:
                full = f"{prefix}[{key}]" if prefix else key
                raise StripeError(
                    400, f"Missing required param: {full}.", code="parameter_missing", param=full
                )
        return out


EXPAND = List(Str())
METADATA = Map()


def endpoint(fields: dict[str, Spec], required: tuple[str, ...] = ()) -> Obj:
    """Top-level schema: every endpoint also takes `expand`."""
    return Obj({"expand": EXPAND, **fields}, required)


def list_endpoint(fields: dict[str, Spec] | None = None, required: tuple[str, ...] = ()) -> Obj:
    return endpoint(
        {
            "limit": Int(1, 100),
            "starting_after": Str(),
            "ending_before": Str(),
            "created": RANGE,
            **(fields or {}),
        },
        required,
    )


class _Range(Spec):
    """`created=123` or `created[gte]=...` as Stripe's list filters take it."""

    _obj = Obj({k: Int() for k in ("gt", "gte", "lt", "lte")})

    def clean(self, value: Any, name: str) -> Any:
        if isinstance(value, str):
            number = Int().clean(value, name)
            return None if number is None else {"gte": number, "lte": number}
        return self._obj.clean(value, name)


RANGE = _Range()


def in_range(ts: int, bounds: dict[str, int] | None) -> bool:
    if not bounds:
        return True
    return (
        ("gt" not in bounds or bounds["gt"] is None or ts > bounds["gt"])
        and ("gte" not in bounds or bounds["gte"] is None or ts >= bounds["gte"])
        and ("lt" not in bounds or bounds["lt"] is None or ts < bounds["lt"])
        and ("lte" not in bounds or bounds["lte"] is None or ts <= bounds["lte"])
    )
