"""web (:7000): the front end; calls books and authors and puts the page together."""
from __future__ import annotations

from typing import Any

from demokit import INSTANCE, call, serve

BOOKS = "http://books.default:7002/books"
AUTHORS = "http://authors.default:7001/authors"


def route(path: str) -> tuple[int, Any]:
    if path.split("?")[0] != "/":
        return 404, {"error": f"no such path {path}"}
    b_status, books = call(BOOKS)
    a_status, authors = call(AUTHORS)
    if b_status != 200 or a_status != 200:
        errors = [body for status, body in ((b_status, books), (a_status, authors)) if status != 200]
        return 502, {"error": "a backend failed", "causes": errors, "instance": INSTANCE}
    return 200, {"web": INSTANCE, "books": books["books"], "authors": authors["authors"],
                 "served_by": {"books": books["instance"], "authors": authors["instance"]}}


if __name__ == "__main__":
    serve("web", route, 7000)
