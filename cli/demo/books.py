"""books (:7002): a list of books, each with its author from the authors service."""
from __future__ import annotations

from typing import Any

from demokit import INSTANCE, call, serve

AUTHORS = "http://authors.default:7001"
BOOKS = [
    {"id": "1", "title": "The Dispossessed", "author": "1"},
    {"id": "2", "title": "Invisible Cities", "author": "2"},
    {"id": "3", "title": "Beloved", "author": "3"},
]


def route(path: str) -> tuple[int, Any]:
    if path.split("?")[0] not in ("/", "/books"):
        return 404, {"error": f"no such path {path}"}
    status, body = call(f"{AUTHORS}/authors")
    if status != 200:
        return 503, {"error": "authors unavailable", "cause": body, "instance": INSTANCE}
    names = {a["id"]: a["name"] for a in body["authors"]}
    books = [{**b, "author": names.get(b["author"], "?")} for b in BOOKS]
    return 200, {"books": books, "instance": INSTANCE, "authors_instance": body.get("instance")}


if __name__ == "__main__":
    serve("books", route, 7002)
