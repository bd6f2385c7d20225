"""Service virtual IPs and pod-IP lookups in destination's registry (`mesh run --netns`)."""
from __future__ import annotations

import json

from destination.registry import Registration, Registry


def reg(name: str, instance: str, address: str, app_port: int, ns: str = "default") -> Registration:
    return Registration.from_json({
        "name": name, "namespace": ns, "instance": instance, "address": address, "app_port": app_port,
        "service_port": None, "identity": f"{name}.{ns}.serviceaccount.identity.cluster.local"})


def test_every_service_gets_a_stable_vip_that_resolves_back() -> None:
    r = Registry()
    r.register(reg("books", "books-1", "10.244.0.2:4143", 7002), 0.0, 3.0)
    r.register(reg("echo", "echo-1", "10.244.0.3:4143", 7003), 0.0, 3.0)
    books = r.snapshot(r.parse("books.default:7002"))
    assert books["vip"] == "10.96.0.1"
    assert r.snapshot(r.parse("echo.default:7003"))["vip"] == "10.96.0.2"
    by_vip = r.snapshot(r.parse("10.96.0.1:7002"))
    assert (by_vip["service"], by_vip["exists"], by_vip["endpoints"]) == ("books.default", True, books["endpoints"])
    assert r.snapshot(r.parse("10.96.0.1:9999"))["exists"] is False       # the wrong port
    assert r.snapshot(r.parse("10.96.0.9:7002"))["exists"] is False       # nobody's VIP
    assert [(s["service"], s["vip"], s["port"]) for s in r.services()] == [
        ("books.default", "10.96.0.1", 7002), ("echo.default", "10.96.0.2", 7003)]
    # the VIP outlives its endpoints and survives a restart (persisted), even for a new service
    r.deregister("books-1", None)
    again = Registry.from_dict(json.loads(json.dumps(r.to_dict())), 0.0, 10.0)
    assert again.snapshot(again.parse("10.96.0.1:7002"))["service"] == "books.default"
    again.register(reg("authors", "authors-1", "10.244.0.4:4143", 7001), 0.0, 3.0)
    assert again.vip("authors.default") == "10.96.0.3"
    assert again.watch_key(again.parse("10.96.0.2:7003")) == "echo.default"


def test_a_pod_ip_resolves_to_that_pods_proxy_but_loopback_never_does() -> None:
    r = Registry()
    r.register(reg("books", "books-1", "10.244.0.2:4143", 7002), 0.0, 3.0)
    r.register(reg("local", "local-1", "127.0.0.1:41001", 8080), 0.0, 3.0)
    pod = r.snapshot(r.parse("10.244.0.2:7002"))
    assert pod["exists"] and [e["address"] for e in pod["endpoints"]] == ["10.244.0.2:4143"]
    assert pod["endpoints"][0]["identity"] == "books.default.serviceaccount.identity.cluster.local"
    assert r.watch_key(r.parse("10.244.0.2:7002")) == "books.default"
    assert r.snapshot(r.parse("10.244.0.2:7003"))["exists"] is False
    assert r.snapshot(r.parse("127.0.0.1:8080"))["exists"] is False
    assert r.watch_key(r.parse("10.244.0.9:80")) == "@10.244.0.9"
