"""Which requests are billed: ``"METHOD /path"`` routes mapped to priced tool names.

A path is matched whole. A parameter written ``{name}`` matches any one segment
(``"GET /reports/{id}"`` matches ``/reports/42``, not ``/reports/42/pdf``); with one of
Starlette's convertors it matches what the framework's route does: ``{id:int}`` digits,
``{x:float}``, ``{u:uuid}``, ``{name:str}`` one segment, ``{p:path}`` the rest of the path,
slashes and all. Any other brace is refused when the middleware is built, so a route can
never be a literal that no request matches. Every other request passes through the
middleware untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mcpbill_cli.errors import InvalidInput

_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?::(str|int|float|uuid|path))?\}")
# What each convertor matches: Starlette's own patterns (starlette.convertors).
_HEX = "[0-9a-fA-F]"
_CONVERTED = {None: "[^/]+", "str": "[^/]+", "int": "[0-9]+", "float": r"[0-9]+(?:\.[0-9]+)?",
              "uuid": "-?".join(f"{_HEX}{{{n}}}" for n in (8, 4, 4, 4, 12)), "path": ".*"}
_METHOD = re.compile(r"[A-Z]+")


@dataclass(frozen=True)
class PaidRoute:
    """One billed route: ``method`` and ``path`` (segments may be ``{name}``) → ``tool``.

    ``max_units`` makes it a per-unit tool: that many units are held while the endpoint runs,
    and what it reports with :func:`~mcpbill_cli.http.report_units` is captured.
    """

    method: str
    path: str
    tool: str
    max_units: int | None = None

    @classmethod
    def parse(cls, route: str, tool: str, *, max_units: int | None = None) -> PaidRoute:
        """``PaidRoute.parse("GET /report", "report")``."""
        method, _, path = route.strip().partition(" ")
        return cls(method.upper(), path.strip(), tool, max_units)


class RouteTable:
    """The billed routes, matched by method and path (exact paths first, then patterns)."""

    def __init__(self, routes: Iterable[PaidRoute]) -> None:
        self._exact: dict[tuple[str, str], PaidRoute] = {}
        self._patterns: list[tuple[str, re.Pattern[str], PaidRoute]] = []
        for route in routes:
            _check(route)
            if _PARAM.search(route.path):
                self._patterns.append((route.method, _compile(route.path), route))
            else:
                self._exact[(route.method, route.path)] = route

    @classmethod
    def of(cls, routes: Mapping[str, str] | Iterable[PaidRoute]) -> RouteTable:
        """A table from ``{"GET /report": "report"}`` or from :class:`PaidRoute` objects."""
        if isinstance(routes, Mapping):
            return cls(PaidRoute.parse(route, tool) for route, tool in routes.items())
        return cls(routes)

    @property
    def routes(self) -> list[PaidRoute]:
        return [*self._exact.values(), *(route for _, _, route in self._patterns)]

    def match(self, method: str, path: str) -> PaidRoute | None:
        """The route billing ``method path``, or ``None``: not billed. A ``HEAD`` is billed as
        the ``GET`` of its path (frameworks answer it by running the ``GET`` endpoint)."""
        found = self._match(method, path)
        if found is None and method == "HEAD":
            return self._match("GET", path)
        return found

    def _match(self, method: str, path: str) -> PaidRoute | None:
        found = self._exact.get((method, path))
        if found is not None:
            return found
        for route_method, pattern, route in self._patterns:
            if route_method == method and pattern.fullmatch(path):
                return route
        return None


def _compile(path: str) -> re.Pattern[str]:
    pattern, end = "", 0
    for param in _PARAM.finditer(path):
        pattern += re.escape(path[end:param.start()]) + _CONVERTED[param.group(1)]
        end = param.end()
    return re.compile(pattern + re.escape(path[end:]))


def _check(route: PaidRoute) -> None:
    if not _METHOD.fullmatch(route.method) or not route.path.startswith("/"):
        raise InvalidInput(f"a billed route is 'METHOD /path' (e.g. 'GET /report'), not "
                           f"{route.method!r} {route.path!r}", field="routes")
    if "{" in _PARAM.sub("", route.path) or "}" in _PARAM.sub("", route.path):
        raise InvalidInput(f"route {route.method} {route.path}: a parameter is {{name}} or "
                           "{name:str|int|float|uuid|path}", field="routes")
    if not route.tool:
        raise InvalidInput(f"route {route.method} {route.path} names no tool", field="routes")
