"""`mesh check`: health checks declared as data, a runner, and a Linkerd-style renderer.

Theory of operation
-------------------
A check is data (after linkerd2's ``Checker{description, hintAnchor, fatal, warning,
check}`` in ``pkg/healthcheck/healthcheck.go``): a category, a description, a hint (a
short text and an anchor), whether a failure is fatal or only a warning, and a function
``fn(ctx) -> Status``. The functions live in ``cli/checks/``; this module holds the
types, the runner and the rendering.

The runner calls each check in order and hands every ``Result`` to an observer callback,
so the CLI can print as it goes. A check may return ``warn(...)`` itself; a check
declared ``warning=True`` has its errors reported as warnings. A *fatal* error stops the
rest of its category and every category that depends on it (``DEPENDS``), as in Linkerd
where nothing after a fatal failure can be trusted.

Rendering is pure (results in, text out): the text form is Linkerd's (√ ‼ ×, an
indented message and hint under each failure, a final "Status check results are √"),
and ``to_json`` follows ``linkerd check -o json``. Only ``cli/main.py`` prints or exits.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checks import CheckContext

log = logging.getLogger(__name__)

SUCCESS, WARNING, ERROR = "success", "warning", "error"
MARK = {SUCCESS: "√", WARNING: "‼", ERROR: "×"}
INDENT = "    "


@dataclass(frozen=True, slots=True)
class Status:
    """What a check function returns."""
    result: str             # SUCCESS | WARNING | ERROR
    message: str = ""       # why (shown under a warning or an error; may span lines)


def ok(message: str = "") -> Status:
    return Status(SUCCESS, message)


def warn(message: str) -> Status:
    return Status(WARNING, message)


def error(message: str) -> Status:
    return Status(ERROR, message)


class CheckFailed(Exception):
    """Raised by the helpers a check uses; the runner reports it as the check's error."""


CheckFn = Callable[["CheckContext"], Status]


@dataclass(frozen=True, slots=True)
class Check:
    category: str           # e.g. "micromesh-identity"
    description: str        # e.g. "issuer cert is valid for at least 60 days"
    hint: str               # what to do about a failure, one short line
    anchor: str             # a stable name for the check, e.g. "mm-issuer-not-expiring-soon"
    fn: CheckFn
    fatal: bool = False     # an error stops the category and the categories depending on it
    warning: bool = False   # an error is only reported as a warning

    @property
    def hint_text(self) -> str:
        return f"{self.hint} (#{self.anchor})"


@dataclass(frozen=True, slots=True)
class Result:
    check: Check
    result: str
    message: str = ""

    @property
    def category(self) -> str:
        return self.check.category


Observer = Callable[[Result], None]


# === the runner ===

def run_one(check: Check, ctx: CheckContext) -> Result:
    """Run one check; a CheckFailed (or, as a last resort, any exception) is its error."""
    try:
        status = check.fn(ctx)
    except CheckFailed as e:
        status = error(str(e))
    except Exception as e:  # task boundary: one broken check must not hide the others
        log.exception("check %r crashed", check.description)
        status = error(f"the check itself failed: {type(e).__name__}: {e}")
    if check.warning and status.result == ERROR:
        status = warn(status.message)
    return Result(check, status.result, status.message)


def run(checks: Sequence[Check], ctx: CheckContext, observer: Observer,
        depends: Mapping[str, Iterable[str]] | None = None) -> bool:
    """Run ``checks`` in order, passing each result to ``observer``. Returns True when no
    check failed (warnings are not failures)."""
    depends = depends or {}
    stopped: set[str] = set()   # categories stopped by a fatal error, or skipped because of one
    success = True
    for check in checks:
        category = check.category
        if category in stopped or any(dep in stopped for dep in depends.get(category, ())):
            stopped.add(category)
            continue
        result = run_one(check, ctx)
        observer(result)
        if result.result == ERROR:
            success = False
            if check.fatal:
                stopped.add(category)
    return success


# === rendering ===

def header(category: str) -> str:
    return f"{category}\n{'-' * len(category)}\n"


def render_result(r: Result) -> str:
    lines = [f"{MARK[r.result]} {r.check.description}"]
    if r.result != SUCCESS:
        lines += [INDENT + line for line in (r.message or "failed").splitlines()]
        lines.append(f"{INDENT}hint: {r.check.hint_text}")
    return "\n".join(lines) + "\n"


def status_line(success: bool) -> str:
    return f"Status check results are {MARK[SUCCESS] if success else MARK[ERROR]}\n"


@dataclass(slots=True)
class TextRenderer:
    """Turns a stream of results into Linkerd's text, a piece at a time (for an observer
    that prints as the checks run)."""
    _category: str | None = None

    def feed(self, r: Result) -> str:
        out = ""
        if r.category != self._category:
            out = ("\n" if self._category is not None else "") + header(r.category)
            self._category = r.category
        return out + render_result(r)

    def finish(self, success: bool) -> str:
        return ("\n" if self._category is not None else "") + status_line(success)


def render_text(results: Iterable[Result], success: bool) -> str:
    renderer = TextRenderer()
    return "".join(renderer.feed(r) for r in results) + renderer.finish(success)


def to_json(results: Iterable[Result], success: bool) -> dict[str, Any]:
    """The shape of ``linkerd check -o json``."""
    categories: list[dict[str, Any]] = []
    for r in results:
        if not categories or categories[-1]["categoryName"] != r.category:
            categories.append({"categoryName": r.category, "checks": []})
        categories[-1]["checks"].append({
            "description": r.check.description,
            "hint": r.check.hint_text if r.result != SUCCESS else "",
            "error": r.message if r.result != SUCCESS else "",
            "result": r.result,
        })
    return {"success": success, "categories": categories}


@dataclass(slots=True)
class Collector:
    """An observer that keeps every result (for JSON, and for tests)."""
    results: list[Result] = field(default_factory=list)

    def __call__(self, r: Result) -> None:
        self.results.append(r)
