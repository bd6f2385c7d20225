"""`mesh stat` / `edges` without I/O: targets, windows, merging, percentiles, Prometheus
queries and answers, and the rendered output pinned by golden files (tests/golden/).

The recorded inputs are real: tests/golden/stats/demo.json holds the /stats answers of
the five proxies of `mesh demo`, tests/golden/prometheus/*.json the answers a real
Prometheus (scraping that demo every second) gave to the queries `build_queries` made.
"""
from __future__ import annotations

import json
from typing import Any

import pytest

from cli import edges, stat, stat_prometheus, stat_render, targets
from cli.stat import ProxyStats, Replica, StatQuery, Tcp, Traffic
from cli.targets import Target, TargetError
from tests.golden_files import GOLDEN, assert_golden

BOUNDS = (1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
          1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0)
NB = len(BOUNDS) + 1
NO_TCP = Tcp()


def hist(**at: int) -> tuple[int, ...]:
    """Bucket counts: ``hist(le1=5, le100=3, inf=1)``."""
    counts = [0] * NB
    for key, n in at.items():
        counts[NB - 1 if key == "inf" else BOUNDS.index(float(key[2:]))] += n
    return tuple(counts)


def inbound(client: str | None, requests: int, failure: int = 0, buckets: tuple[int, ...] | None = None,
            ns: str = "default") -> Traffic:
    ident = f"{client}.{ns}.serviceaccount.identity.cluster.local" if client else None
    return Traffic("inbound", "x.default:80", client, ns if client else None, ident, client is not None,
                   requests, requests - failure, failure, buckets or hist(le1=requests))


def outbound(dst: str, requests: int, failure: int = 0, buckets: tuple[int, ...] | None = None,
             authority: str | None = None, pod: str | None = None) -> Traffic:
    return Traffic("outbound", authority or f"{dst}.default:80", dst, "default",
                   f"{dst}.default.serviceaccount.identity.cluster.local", True,
                   requests, requests - failure, failure, buckets or hist(le1=requests), pod)


def proxy(workload: str, pod: str, elapsed: float = 60.0, inb: tuple[Traffic, ...] = (),
          out: tuple[Traffic, ...] = (), tcp_in: Tcp = NO_TCP) -> ProxyStats:
    return ProxyStats(workload, "default", pod, f"{workload}.default.serviceaccount.identity.cluster.local",
                      elapsed, BOUNDS, inb, out, tcp_in)


# === targets and windows ===

@pytest.mark.parametrize(("args", "want"), [
    (("deploy/books",), Target("deploy", "books")),
    (("deployment", "books"), Target("deploy", "books")),
    (("deploy",), Target("deploy")),
    (("po/books-3f7c",), Target("pod", "books-3f7c")),
    (("pods",), Target("pod")),
    (("ns/default",), Target("ns", "default")),
    (("namespace",), Target("ns")),
    (("au/books.default:7002",), Target("authority", "books.default:7002")),
])
def test_targets_parse_like_linkerd(args: tuple[str, ...], want: Target) -> None:
    assert targets.parse(args) == want


@pytest.mark.parametrize(("args", "message"), [
    (("books",), "unknown resource type 'books'"),
    (("deploy/",), "invalid target"),
    (("deploy/a/b",), "invalid target"),
    (("deploy/a", "b"), "either TYPE/NAME or TYPE NAME"),
    (("deploy", "a", "b"), "too many"),
    ((), "no target"),
])
def test_bad_targets_are_one_line_errors(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(TargetError, match=message) as e:
        targets.parse(args)
    assert "\n" not in str(e.value)


def test_a_type_can_be_refused_where_it_makes_no_sense() -> None:
    with pytest.raises(TargetError, match="not supported here"):
        targets.parse(("authority",), (targets.DEPLOY, targets.POD, targets.NS))
    with pytest.raises(TargetError, match="names no resource"):
        targets.parse_one("deploy")


def test_select_by_deploy_pod_namespace() -> None:
    recs = [{"name": "web", "namespace": "default", "instance": "web-1"},
            {"name": "web", "namespace": "shop", "instance": "web-2"},
            {"name": "books", "namespace": "default", "instance": "books-1"}]

    def names(t: Target | None, ns: str | None) -> list[str]:
        return [r["instance"] for r in targets.select(t, recs, ns)]
    assert names(Target("deploy", "web"), "default") == ["web-1"]
    assert names(Target("deploy", "web"), None) == ["web-1", "web-2"]
    assert names(Target("pod", "books-1"), "default") == ["books-1"]
    assert names(Target("ns", "shop"), "default") == ["web-2"]      # ns/NAME ignores -n
    assert names(Target("deploy"), "default") == ["web-1", "books-1"]
    assert names(None, None) == ["web-1", "web-2", "books-1"]


@pytest.mark.parametrize(("text", "seconds"), [
    ("10s", 10), ("1m", 60), ("5m", 300), ("1m30s", 90), ("90", 90), ("10m", 600), ("2000ms", 2),
])
def test_windows(text: str, seconds: int) -> None:
    assert stat.parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "m", "0s", "11m", "1h", "5 m", "-1m"])
def test_bad_windows(text: str) -> None:
    with pytest.raises(ValueError):
        stat.parse_window(text)


# === percentiles: Prometheus' histogram_quantile ===

@pytest.mark.parametrize(("q", "buckets", "want"), [
    (0.5, hist(le1=10), 0.5),                       # first bucket starts at 0
    (0.99, hist(le1=10), 0.99),
    (0.5, hist(le10=4), 7.5),                       # (5, 10]: 5 + 5 * 2/4
    (0.5, hist(le1=2, le10=2), 1.0),                # rank 2 ends exactly at le=1
    (0.75, hist(le1=2, le10=2), 7.5),
    (0.5, hist(inf=3), 50000.0),                    # +Inf: the highest finite bound
    (0.99, hist(le1=98, inf=2), 50000.0),
    (0.5, hist(), None),
])
def test_quantile_interpolates_like_prometheus(q: float, buckets: tuple[int, ...], want: float | None) -> None:
    got = stat.quantile(q, BOUNDS, buckets)
    assert got == pytest.approx(want) if want is not None else got is None


@pytest.mark.parametrize(("value", "shown"), [(None, None), (0.49, 0), (0.5, 1), (1.5, 2), (94.99, 95)])
def test_latency_cells_round_half_away_from_zero(value: float | None, shown: int | None) -> None:
    assert stat_render.round_ms(value) == shown


# === merging ===

def test_percentiles_come_from_the_merged_histogram_never_from_averages() -> None:
    fast = proxy("books", "books-1", inb=(inbound("web", 100, buckets=hist(le1=100)),))
    slow = proxy("books", "books-2", inb=(inbound("web", 100, buckets=hist(le100=100)),))
    [row] = stat.compute(StatQuery(Target("deploy")),
                         [Replica("books", "default", "books-1", True),
                          Replica("books", "default", "books-2", True)], [fast, slow])
    assert row.p50 == pytest.approx(1.0)           # rank 100 of 200 ends the le=1 bucket
    assert row.p95 == pytest.approx(95.0)          # rank 190: 50 + 50 * 90/100
    each = [stat.quantile(0.95, BOUNDS, hist(le1=100)), stat.quantile(0.95, BOUNDS, hist(le100=100))]
    assert each == [pytest.approx(0.95), pytest.approx(97.5)]   # averaging would claim ~49 ms


def test_rates_add_per_proxy_over_each_proxys_elapsed_time() -> None:
    old = proxy("books", "books-1", elapsed=60.0, inb=(inbound("web", 60, failure=6),),
                tcp_in=Tcp(open=2, read_bytes=600, write_bytes=1200))
    young = proxy("books", "books-2", elapsed=10.0, inb=(inbound("web", 30), inbound(None, 10, failure=4)),
                  tcp_in=Tcp(open=1, read_bytes=100, write_bytes=100))
    [row] = stat.compute(StatQuery(Target("deploy")),
                         [Replica("books", "default", "books-1", True),
                          Replica("books", "default", "books-2", False)], [old, young])
    assert row.rps == pytest.approx(60 / 60 + 40 / 10)
    assert row.success_rate == pytest.approx((54 + 36) / 100)
    assert (row.meshed, row.tcp_conn) == ("1/2", 3)
    assert row.read_rate == pytest.approx(600 / 60 + 100 / 10)
    assert row.write_rate == pytest.approx(1200 / 60 + 100 / 10)


def test_from_keeps_the_inbound_rows_of_that_client() -> None:
    p = proxy("books", "books-1", inb=(inbound("web", 10, failure=5), inbound("traffic", 30)))
    reps = [Replica("books", "default", "books-1", True)]
    [row] = stat.compute(StatQuery(Target("deploy"), from_=Target("deploy", "web")), reps, [p])
    assert (row.requests, row.success_rate, row.tcp_conn) == (10, 0.5, None)
    [row] = stat.compute(StatQuery(Target("deploy"), from_=Target("ns", "default")), reps, [p])
    assert row.requests == 40
    [row] = stat.compute(StatQuery(Target("deploy"), from_=Target("deploy", "nobody")), reps, [p])
    assert not row.has_data


def test_to_keeps_the_outbound_rows_toward_that_destination() -> None:
    p = proxy("web", "web-1", inb=(inbound("traffic", 99),),
              out=(outbound("authors", 20, failure=2, pod="authors-1"), outbound("books", 7)))
    reps = [Replica("web", "default", "web-1", True)]

    def rows(to: Target) -> list[stat.StatRow]:
        return stat.compute(StatQuery(Target("deploy", "web"), to=to), reps, [p])
    assert rows(Target("deploy", "authors"))[0].requests == 20
    assert rows(Target("deploy", "authors"))[0].success_rate == 0.9
    assert rows(Target("authority", "books.default:80"))[0].requests == 7
    assert rows(Target("pod", "authors-1"))[0].requests == 20
    assert rows(Target("ns", "default"))[0].requests == 27


def test_authority_rows_are_outbound_rows_grouped_by_authority() -> None:
    a = proxy("web", "web-1", out=(outbound("books", 5, authority="books.default:7002"),))
    b = proxy("traffic", "traffic-1", out=(outbound("books", 3, failure=3, authority="books.default:7002"),
                                           outbound("web", 4, authority="web.default:7000")))
    rows = stat.compute(StatQuery(Target("authority")), [], [a, b])
    assert [(r.name, r.requests, r.meshed, r.tcp_conn) for r in rows] == [
        ("books.default:7002", 8, "-", None), ("web.default:7000", 4, "-", None)]
    assert rows[0].success_rate == pytest.approx(5 / 8)


def test_replicas_without_an_answer_are_rows_without_data() -> None:
    rows = stat.compute(StatQuery(Target("pod")), [Replica("web", "default", "web-1", False)], [])
    assert [(r.name, r.status, r.meshed, r.has_data) for r in rows] == [("web-1", "NotReady", "0/1", False)]


@pytest.mark.parametrize(("query", "message"), [
    (StatQuery(Target("deploy"), from_=Target("deploy", "a"), to=Target("deploy", "b")), "mutually exclusive"),
    (StatQuery(Target("deploy"), from_=Target("pod", "a-1")), "use --from deploy/NAME"),
    (StatQuery(Target("authority"), to=Target("deploy", "a")), "not supported with the authority"),
    (StatQuery(Target("deploy"), from_=Target("authority", "a:1")), "an authority is a destination"),
])
def test_queries_that_make_no_sense_are_refused(query: StatQuery, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        query.validate()


def test_parse_stats_maps_client_identities_to_workloads() -> None:
    doc = {"workload": "books", "namespace": "default", "pod": "books-1", "identity": "books.default.x",
           "elapsed": 12.5, "buckets_ms": list(BOUNDS),
           "inbound": [{"authority": "books:1", "client_id": "sa-web.default.serviceaccount.identity.cluster.local",
                        "tls": True, "requests": 3, "success": 3, "failure": 0, "latency_ms_buckets": [3]},
                       {"authority": "books:1", "client_id": "other.shop.serviceaccount.identity.cluster.local",
                        "tls": True, "requests": 1, "success": 1, "failure": 0, "latency_ms_buckets": [1]}],
           "outbound": [], "tcp": {"inbound": {"open": 2, "read_bytes": 10, "write_bytes": 20}}}
    peer_of = stat.peer_lookup([{"identity": "sa-web.default.serviceaccount.identity.cluster.local",
                                 "name": "web", "namespace": "default"}])
    p = stat.parse_stats(doc, peer_of)
    assert [(t.peer_workload, t.peer_namespace) for t in p.inbound] == [("web", "default"), ("other", "shop")]
    assert p.inbound[0].buckets == (3,) + (0,) * (NB - 1)     # short lists are padded
    assert (p.tcp_in, p.tcp_out, p.elapsed) == (Tcp(2, 10, 20), Tcp(), 12.5)
    with pytest.raises(KeyError):
        stat.parse_stats({"workload": "x"}, peer_of)


# === rendering: the recorded demo, pinned by golden files ===

def demo() -> tuple[list[dict[str, Any]], list[ProxyStats]]:
    doc = json.loads((GOLDEN / "stats" / "demo.json").read_text())
    peer_of = stat.peer_lookup(doc["workloads"])
    return doc["workloads"], [stat.parse_stats(s, peer_of) for s in doc["stats"]]


def demo_rows(query: StatQuery) -> list[stat.StatRow]:
    workloads, stats = demo()
    selected = targets.select(query.target, workloads, query.namespace) \
        if query.target.kind != targets.AUTHORITY else workloads
    return stat.compute(query, stat.replicas(selected, {w["instance"]: True for w in workloads}), stats)


@pytest.mark.parametrize(("name", "query", "wide", "all_ns"), [
    ("stat_deploy.txt", StatQuery(Target("deploy")), False, False),
    ("stat_deploy_wide.txt", StatQuery(Target("deploy")), True, False),
    ("stat_pod.txt", StatQuery(Target("pod")), False, False),
    ("stat_ns.txt", StatQuery(Target("ns")), False, False),
    ("stat_authority.txt", StatQuery(Target("authority")), True, False),
    ("stat_all_namespaces.txt", StatQuery(Target("deploy"), None), False, True),
    ("stat_to.txt", StatQuery(Target("deploy", "web"), to=Target("deploy", "authors")), False, False),
    ("stat_from.txt", StatQuery(Target("deploy"), from_=Target("deploy", "web")), False, False),
])
def test_stat_tables(name: str, query: StatQuery, wide: bool, all_ns: bool) -> None:
    assert_golden(name, stat_render.render_table(demo_rows(query), query.target.kind, wide, all_ns))


def test_stat_json() -> None:
    assert_golden("stat_deploy.json", stat_render.render_json(demo_rows(StatQuery(Target("deploy")))))


def test_stat_table_matches_linkerds_layout() -> None:
    """linkerd2 viz/cmd/testdata/stat_one_output.golden, rebuilt from the same numbers."""
    row = stat.StatRow("emojivoto1", "deploy", "emoji", "1/2", requests=123, success=123, rps=2.05,
                       p50=123, p95=123, p99=123, tcp_conn=123)
    assert stat_render.render_table([row], "deploy") == (
        "NAME    MESHED   SUCCESS      RPS   LATENCY_P50   LATENCY_P95   LATENCY_P99   TCP_CONN\n"
        "emoji      1/2   100.00%   2.0rps         123ms         123ms         123ms        123\n")
    assert stat_render.render_table([row], "deploy", all_namespaces=True).splitlines()[1] == (
        "emojivoto1   emoji      1/2   100.00%   2.0rps         123ms         123ms         123ms        123")


def test_edges_tables() -> None:
    _, stats = demo()
    rows = edges.edges(stats, "default")
    assert_golden("edges.txt", edges.render_table(rows))
    assert_golden("edges_wide.txt", edges.render_table(rows, wide=True))
    assert_golden("edges.json", edges.render_json(rows))
    assert edges.edges(stats, "elsewhere") == []


def test_edges_show_unmeshed_clients_and_plaintext_as_insecure() -> None:
    books = proxy("books", "books-1", inb=(inbound(None, 3), inbound("web", 2)))
    web = proxy("web", "web-1", out=(outbound("books", 2),))
    rows = edges.edges([books, web])
    assert [(e.src, e.dst, e.secured) for e in rows] == [("web", "books", True), ("unmeshed", "books", False)]
    assert edges.render_table(rows, wide=True) == (
        "SRC        DST     SRC_NS    DST_NS    CLIENT_ID     SERVER_ID       SECURED\n"
        "web        books   default   default   web.default   books.default   √\n"
        "unmeshed   books   -         default   -             books.default   ×\n")


# === Prometheus: the queries, and real answers ===

def recorded(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GOLDEN / "prometheus" / f"{name}.json").read_text())
    return doc


PROM_CASES = {
    "deploy": StatQuery(Target("deploy")),
    "pod": StatQuery(Target("pod")),
    "authority": StatQuery(Target("authority")),
    "to": StatQuery(Target("deploy", "web"), to=Target("deploy", "authors")),
    "from": StatQuery(Target("deploy"), from_=Target("deploy", "web")),
}


def identity_of(name: str, ns: str) -> str:
    return f"{name}.{ns}.serviceaccount.identity.cluster.local"


@pytest.mark.parametrize("case", sorted(PROM_CASES))
def test_prometheus_queries_are_the_recorded_ones(case: str) -> None:
    assert stat_prometheus.build_queries(PROM_CASES[case], 20, identity_of) == recorded(case)["queries"]


@pytest.mark.parametrize("case", sorted(PROM_CASES))
def test_prometheus_answers_make_the_same_table(case: str) -> None:
    rec = recorded(case)
    results = {k: stat_prometheus.parse_vector(v) for k, v in rec["answers"].items()}
    query = PROM_CASES[case]
    rows = stat_prometheus.rows(query, results, rec["window"], rec["pods"])
    assert_golden(f"prometheus_{case}.txt", stat_render.render_table(rows, query.target.kind, wide=True))


def test_prometheus_selectors() -> None:
    q = stat_prometheus.build_queries(
        StatQuery(Target("deploy", "books"), "shop", from_=Target("ns", "front")), 60, identity_of)
    assert q["responses"] == (
        'sum(increase(response_total{direction="inbound",namespace="shop",workload="books",'
        'client_id=~"[^.]+\\\\.front\\\\.serviceaccount\\\\..+"}[60s])) by (namespace, workload, classification)')
    assert "tcp_open" not in q          # TCP is per proxy, not per client
    q = stat_prometheus.build_queries(StatQuery(Target("ns"), None), 60, identity_of)
    assert q["tcp_open"] == 'sum(tcp_open_connections{direction="inbound"}) by (namespace)'
    q = stat_prometheus.build_queries(StatQuery(Target("authority", "a.b:1"), from_=Target("deploy", "web")),
                                      60, identity_of)
    assert 'authority="a.b:1",workload="web"' in q["p99"] and "meshed" not in q


def test_prometheus_parse_errors() -> None:
    with pytest.raises(stat_prometheus.PrometheusError, match="parse error"):
        stat_prometheus.parse_vector({"status": "error", "errorType": "bad_data", "error": "parse error at char 5"})
    with pytest.raises(stat_prometheus.PrometheusError, match="expected a vector"):
        stat_prometheus.parse_vector({"status": "success", "data": {"resultType": "matrix", "result": []}})
    nan = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"namespace": "default", "workload": "web"}, "value": [1.0, "NaN"]}]}}
    rows = stat_prometheus.rows(StatQuery(Target("deploy")), {"p50": stat_prometheus.parse_vector(nan)}, 60)
    assert rows[0].p50 is None and not rows[0].has_data


def test_golden_dir_has_no_strays() -> None:
    """Every golden file belongs to a test (a renamed test must not leave its old file)."""
    expected = {"stat_deploy.txt", "stat_deploy_wide.txt", "stat_pod.txt", "stat_ns.txt",
                "stat_authority.txt", "stat_all_namespaces.txt", "stat_to.txt", "stat_from.txt",
                "stat_deploy.json", "edges.txt", "edges_wide.txt", "edges.json",
                *(f"prometheus_{c}.txt" for c in PROM_CASES),
                "tap.txt", "tap_wide.txt", "tap.jsonl", "top_80x24.txt", "top_narrow.txt"}
    mine = ("stat_", "edges", "prometheus_", "tap", "top_")
    found = {p.name for p in GOLDEN.iterdir() if p.is_file() and p.name.startswith(mine)}
    assert found == expected
