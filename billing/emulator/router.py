"""Route table: (method, path template) → handler with its parameter schema."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from billing.emulator.params import Obj

LockKey = Callable[[Any, dict[str, Any]], "tuple[str, ...] | None"]  # (state, params)


@dataclass(slots=True)
class Route:
    method: str
    template: str
    handler: Callable[..., Any]
    schema: Obj
    lock_key: LockKey | None = None


class Router:
    def __init__(self) -> None:
        self._static: dict[tuple[str, str], Route] = {}
        self._dynamic: list[tuple[str, re.Pattern[str], Route]] = []

    def route(
        self, method: str, template: str, schema: Obj, lock_key: LockKey | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            route = Route(method, template, fn, schema, lock_key)
            if "{" not in template:
                self._static[(method, template)] = route
            else:
                regex = re.compile("^" + re.sub(r"\{\w+\}", "([^/]+)", template) + "$")
                self._dynamic.append((method, regex, route))
            return fn

        return register

    def match(self, method: str, path: str) -> tuple[Route, tuple[str, ...]] | None:
        route = self._static.get((method, path))
        if route is not None:
            return route, ()
        for route_method, regex, route in self._dynamic:
            if route_method == method:
                m = regex.match(path)
                if m:
                    return route, m.groups()
        return None


router = Router()
