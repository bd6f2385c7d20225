"""destination.registry: the pure endpoint table (no loop, no clock)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from destination.registry import (AuthorityError, Forbidden, NotFound, Registration, Registry,
                                  RegistryError, Target, parse_authority)
from identity import ca

TTL = 3.0


def body(name: str = "books", instance: str = "books-1", port: int = 41001, ns: str = "default",
         sa: str | None = None, **over: Any) -> dict[str, Any]:
    sa = sa or name
    b: dict[str, Any] = {"name": name, "namespace": ns, "identity": ca.identity_name(sa, ns),
                         "address": f"127.0.0.1:{port}", "app_port": 8080, "service_port": None,
                         "instance": instance, "service_account": sa}
    b.update(over)
    return b


def reg(**kw: Any) -> Registration:
    return Registration.from_json(body(**kw))


def snap(r: Registry, authority: str, namespace: str | None = None) -> dict[str, Any]:
    return r.snapshot(r.parse(authority, namespace))


def addresses(s: dict[str, Any]) -> list[str]:
    return [e["address"] for e in s["endpoints"]]


# === Authorities ===

AUTHORITIES = [
    # (authority, namespace param, expected Target)
    ("books.default:8080", None, Target("books.default", 8080, "books", "default")),
    ("books.default.svc:8080", None, Target("books.default.svc", 8080, "books", "default")),
    ("books.default.svc.cluster.local:8080", None,
     Target("books.default.svc.cluster.local", 8080, "books", "default")),
    ("Books.Default.SVC.Cluster.Local.:8080", None,
     Target("books.default.svc.cluster.local", 8080, "books", "default")),
    ("books.default.:8080", None, Target("books.default", 8080, "books", "default")),
    ("books:8080", "default", Target("books.default", 8080, "books", "default")),
    ("books:8080", "Default", Target("books.default", 8080, "books", "default")),
    ("books.default", None, Target("books.default", 80, "books", "default")),
    ("books.other:8080", "default", Target("books.other", 8080, "books", "other")),
    # well-formed but not a mesh service: exists false, never an error
    ("books.default.svc.example.org:8080", None, Target("books.default.svc.example.org", 8080)),
    ("www.example.com:443", None, Target("www.example.com", 443)),
    ("127.0.0.1:9000", None, Target("127.0.0.1", 9000)),
    ("[::1]:9000", None, Target("[::1]", 9000)),
    ("[::1]", None, Target("[::1]", 80)),
]


@pytest.mark.parametrize("authority,ns,want", AUTHORITIES, ids=[a[0] + (f"?ns={a[1]}" if a[1] else "") for a in AUTHORITIES])
def test_parse_authority(authority: str, ns: str | None, want: Target) -> None:
    assert parse_authority(authority, ns) == want


BAD_AUTHORITIES = [
    ("", None), (":8080", None), ("books.default:", None), ("books.default:http", None),
    ("books.default:0", None), ("books.default:65536", None), ("books.default:123456", None),
    ("books..default:80", None), ("bo_oks.default:80", None), ("books.default/x:80", None),
    ("books:8080", None), ("books:8080", "Bad_NS"), ("-books.default:80", None),
    ("[::1", None), ("[zz]:80", None), ("[::1]x", None), ("a" * 254 + ":80", None),
]


@pytest.mark.parametrize("authority,ns", BAD_AUTHORITIES, ids=[f"{a!r}/{n}" for a, n in BAD_AUTHORITIES])
def test_parse_authority_rejects(authority: str, ns: str | None) -> None:
    with pytest.raises(AuthorityError):
        parse_authority(authority, ns)


def test_parse_authority_other_trust_domain() -> None:
    t = parse_authority("books.default.svc.example.org:80", trust_domain="example.org")
    assert t.key == "books.default"


# === Registration validation ===

BAD_BODIES = [
    # (case, override, field named in the error)
    ("name missing", {"name": None}, "name"),
    ("name not a label", {"name": "Books"}, "name"),
    ("namespace not a label", {"namespace": "de_fault"}, "namespace"),
    ("identity not a mesh identity", {"identity": "books"}, "identity"),
    ("address without port", {"address": "127.0.0.1"}, "address"),
    ("address port zero", {"address": "127.0.0.1:0"}, "address"),
    ("address port too big", {"address": "127.0.0.1:70000"}, "address"),
    ("address bad host", {"address": "a b:80"}, "address"),
    ("app_port missing", {"app_port": None}, "app_port"),
    ("app_port a string", {"app_port": "8080"}, "app_port"),
    ("app_port a bool", {"app_port": True}, "app_port"),
    ("app_port zero", {"app_port": 0}, "app_port"),
    ("service_port too big", {"service_port": 65536}, "service_port"),
    ("instance missing", {"instance": None}, "instance"),
    ("instance with a slash", {"instance": "a/b"}, "instance"),
    ("service_account not a label", {"service_account": "B!"}, "service_account"),
]


@pytest.mark.parametrize("case,over,fieldname", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_registration_rejects(case: str, over: dict[str, Any], fieldname: str) -> None:
    with pytest.raises(RegistryError, match=f"'{fieldname}'") as info:
        Registration.from_json(body(**over))
    assert info.value.status == 400


def test_registration_not_an_object() -> None:
    with pytest.raises(RegistryError, match="object"):
        Registration.from_json([1, 2])


@pytest.mark.parametrize("over", [
    {"service_account": "admin"},                                         # sa other than identity's
    {"namespace": "prod"},                                                # ns other than identity's
    {"identity": ca.identity_name("books", "default", "example.org")},    # other trust domain
])
def test_registration_identity_must_be_its_service_account(over: dict[str, Any]) -> None:
    with pytest.raises(Forbidden):
        Registration.from_json(body(**over))


def test_registration_defaults_service_account_from_identity() -> None:
    assert Registration.from_json(body(service_account=None)).service_account == "books"


# === The table ===

def test_unknown_authority_is_explicitly_absent() -> None:
    r = Registry()
    s = snap(r, "nope.default:80")
    assert s == {"version": 0, "authority": "nope.default.svc.cluster.local:80", "service": "nope.default",
                 "port": 80, "exists": False, "endpoints": []}
    assert snap(r, "www.example.com:443")["service"] is None
    assert snap(r, "www.example.com:443")["authority"] == "www.example.com:443"


def test_register_and_snapshot() -> None:
    r = Registry()
    done = r.register(reg(), 0.0, TTL)
    assert (done.service, done.port, done.changed) == ("books.default", 8080, frozenset({"books.default"}))
    s = snap(r, "books.default.svc.cluster.local:8080")
    assert s == {
        "version": 1, "authority": "books.default.svc.cluster.local:8080", "service": "books.default",
        "port": 8080, "exists": True, "vip": "10.96.0.1",
        "endpoints": [{"address": "127.0.0.1:41001", "weight": 10000,
                       "identity": "books.default.serviceaccount.identity.cluster.local",
                       "protocol_hint": "http/1",
                       "labels": {"workload": "books", "namespace": "default", "pod": "books-1",
                                  "service_account": "books"}}],
    }
    for form, ns in [("books.default:8080", None), ("books.default.svc:8080", None), ("books:8080", "default")]:
        assert snap(r, form, ns)["endpoints"] == s["endpoints"]
    # the wrong port is not the service
    wrong = snap(r, "books.default:9090")
    assert (wrong["exists"], wrong["endpoints"], wrong["service"]) == (False, [], "books.default")


def test_replicas_share_the_first_service_port() -> None:
    r = Registry()
    assert r.register(reg(service_port=80), 0.0, TTL).port == 80
    second = r.register(reg(instance="books-2", port=41002, service_port=9999, app_port=9000), 0.0, TTL)
    assert second.port == 80
    assert addresses(snap(r, "books.default:80")) == ["127.0.0.1:41001", "127.0.0.1:41002"]
    assert not snap(r, "books.default:9999")["exists"]


def test_renewal_is_not_a_change() -> None:
    r = Registry()
    r.register(reg(), 0.0, TTL)
    v = r.version
    assert r.register(reg(), 2.0, TTL).changed == frozenset()
    assert r.version == v
    assert r.expire(4.0) == frozenset()          # renewed at 2 -> lives until 5
    assert r.expire(5.0) == frozenset({"books.default"})


def test_reregistering_with_new_data_is_a_change() -> None:
    r = Registry()
    r.register(reg(), 0.0, TTL)
    done = r.register(reg(port=41009), 1.0, TTL)
    assert done.changed == frozenset({"books.default"})
    assert addresses(snap(r, "books.default:8080")) == ["127.0.0.1:41009"]


def test_instance_moving_service_changes_both() -> None:
    r = Registry()
    r.register(reg(), 0.0, TTL)
    done = r.register(reg(name="library", sa="books", instance="books-1"), 0.0, TTL)
    assert done.changed == frozenset({"books.default", "library.default"})
    assert snap(r, "books.default:8080")["endpoints"] == []
    assert snap(r, "books.default:8080")["exists"]  # a known service, now without endpoints


def test_lease_expiry() -> None:
    r = Registry()
    r.register(reg(instance="a", port=41001), 0.0, TTL)
    r.register(reg(instance="b", port=41002), 1.0, TTL)
    assert r.next_expiry() == 3.0
    assert r.expire(2.9) == frozenset()
    assert r.expire(3.0) == frozenset({"books.default"})
    assert addresses(snap(r, "books.default:8080")) == ["127.0.0.1:41002"]
    assert r.next_expiry() == 4.0
    r.expire(4.0)
    s = snap(r, "books.default:8080")
    assert (s["exists"], s["endpoints"]) == (True, [])
    assert r.next_expiry() is None


def test_port_is_fixed_afresh_once_a_service_is_empty() -> None:
    r = Registry()
    r.register(reg(service_port=80), 0.0, TTL)
    r.expire(10.0)
    assert r.register(reg(instance="books-2", service_port=81), 10.0, TTL).port == 81
    assert snap(r, "books.default:81")["exists"] and not snap(r, "books.default:80")["exists"]


def test_deregister() -> None:
    r = Registry()
    r.register(reg(instance="a"), 0.0, TTL)
    r.register(reg(instance="b", port=41002), 0.0, TTL)
    with pytest.raises(Forbidden):
        r.deregister("a", ca.identity_name("thief", "default"))
    with pytest.raises(NotFound):
        r.deregister("zzz", ca.identity_name("books", "default"))
    assert r.deregister("a", ca.identity_name("books", "default")) == frozenset({"books.default"})
    assert addresses(snap(r, "books.default:8080")) == ["127.0.0.1:41002"]
    with pytest.raises(NotFound):
        r.deregister("a", None)


def test_instance_belongs_to_its_identity() -> None:
    r = Registry()
    r.register(reg(instance="shared"), 0.0, TTL)
    with pytest.raises(Forbidden):
        r.register(reg(name="thief", instance="shared"), 0.0, TTL)


def test_versions_only_grow() -> None:
    r = Registry()
    seen = [r.version]
    r.register(reg(instance="a"), 0.0, TTL); seen.append(snap(r, "books.default:8080")["version"])
    r.register(reg(name="other", instance="o"), 0.0, TTL); seen.append(r.version)
    r.register(reg(instance="b", port=41002), 0.0, TTL); seen.append(snap(r, "books.default:8080")["version"])
    r.deregister("b", None); seen.append(snap(r, "books.default:8080")["version"])
    r.expire(100.0); seen.append(snap(r, "books.default:8080")["version"])
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    # an unknown service carries the current counter, so its later appearance is newer
    before = snap(r, "late.default:8080")["version"]
    r.register(reg(name="late", instance="l"), 100.0, TTL)
    assert snap(r, "late.default:8080")["version"] > before


def test_changes_touch_only_their_service() -> None:
    r = Registry()
    r.register(reg(instance="a"), 0.0, TTL)
    v = snap(r, "books.default:8080")["version"]
    r.register(reg(name="other", instance="o"), 0.0, TTL)
    assert snap(r, "books.default:8080")["version"] == v


def test_persistence_round_trip() -> None:
    r = Registry()
    r.register(reg(instance="a", service_port=80), 0.0, TTL)
    r.register(reg(instance="b", port=41002), 0.0, TTL)
    r.register(reg(name="gone", instance="g"), 0.0, TTL)
    r.deregister("g", None)
    state = json.loads(json.dumps(r.to_dict()))  # what goes through the file
    loaded = Registry.from_dict(state, now=500.0, lease=10.0)
    for authority in ("books.default:80", "gone.default:8080", "nope.default:80"):
        assert snap(loaded, authority) == snap(r, authority)
    assert loaded.version == r.version
    assert loaded.next_expiry() == 510.0           # leases restart from now
    assert loaded.expire(509.0) == frozenset()
    assert loaded.expire(510.0) == frozenset({"books.default"})
    assert loaded.version == r.version + 1          # and keep counting up
    assert [w["instance"] for w in loaded.workloads(510.0)] == []


@pytest.mark.parametrize("state", [
    {}, {"format": 99}, {"format": 1, "version": 1}, {"format": 1, "version": "x", "services": [], "workloads": []},
    {"format": 1, "version": 1, "services": [{"name": "Bad", "namespace": "d", "port": 1, "version": 1}],
     "workloads": []},
    {"format": 1, "version": 1, "services": [], "workloads": [{"name": "x"}]},
    [], "nope",
])
def test_from_dict_rejects_garbage(state: Any) -> None:
    with pytest.raises(ValueError):
        Registry.from_dict(state, 0.0, 10.0)


def test_workloads_listing() -> None:
    r = Registry()
    r.register(reg(instance="a"), 0.0, TTL)
    [w] = r.workloads(1.0)
    assert w["instance"] == "a" and w["service"] == "books.default" and w["port"] == 8080
    assert w["lease_expires_in"] == 2.0


def test_shared_service_and_own_name_both_resolve() -> None:
    """`mesh run --service books`: the replica is an endpoint of books and of its own name."""
    from destination.registry import Registration, Registry
    r = Registry()
    regs = [Registration.from_json({"name": f"books-{v}", "namespace": "default", "service": "books",
                                    "identity": f"books-{v}.default.serviceaccount.identity.cluster.local",
                                    "address": f"127.0.0.1:4100{i}", "app_port": 7010 + i,
                                    "instance": f"books-{v}-1"}) for i, v in enumerate(("v1", "v2"))]
    assert regs[0].to_json()["service"] == "books" and regs[0].service == "books.default"
    done = [r.register(g, 0.0, 10.0) for g in regs]
    assert done[0].changed == {"books.default", "books-v1.default"}
    assert done[1].port == 7010   # joins the shared service's port
    snap = r.snapshot(r.parse("books.default:7010"))
    assert [e["labels"]["workload"] for e in snap["endpoints"]] == ["books-v1", "books-v2"]
    own = r.snapshot(r.parse("books-v2.default:7011"))
    assert [e["address"] for e in own["endpoints"]] == ["127.0.0.1:41001"]
    assert r.deregister("books-v1-1", None) == {"books.default", "books-v1.default"}
    assert len(r.snapshot(r.parse("books.default:7010"))["endpoints"]) == 1
    again = Registry.from_dict(r.to_dict(), 0.0, 10.0)
    assert len(again.snapshot(again.parse("books.default:7010"))["endpoints"]) == 1
