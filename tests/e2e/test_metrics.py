"""Prometheus metrics: `GET /metrics` (OpenMetrics text, loopback clients) after real
commands, and a real Prometheus (Debian's `prometheus` package) scraping the server
with Kiln's alert rules loaded, evaluating the Grafana dashboard's queries.

Privilege tier: the suite's (a running `kiln serve` on loopback); the second test also
needs /usr/bin/prometheus (scripts/install-deps.sh installs it) and fails, not skips,
without it.
"""

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Tuple
from urllib.parse import urlsplit

import httpx
import pytest
from e2b import CommandExitException

from helpers import stop_process, wait_until

PROMETHEUS = "/usr/bin/prometheus"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "kiln.json"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$instance": ".*"}

Labels = FrozenSet[Tuple[str, str]]
Samples = Dict[Tuple[str, Labels], float]

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_openmetrics(text: str) -> Tuple[Samples, Dict[str, str]]:
    """The samples of an OpenMetrics text ((name, labels) -> value) and the type of
    each family (`# TYPE name type`). Enough of the format for Kiln's metrics: no
    exemplars, label values unescaped only for `\\"`, `\\\\` and `\\n`."""
    lines = text.rstrip("\n").split("\n")
    assert lines[-1] == "# EOF", f"OpenMetrics text must end with '# EOF': {lines[-3:]}"
    samples: Samples = {}
    types: Dict[str, str] = {}
    for line in lines[:-1]:
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"not an OpenMetrics sample line: {line!r}"
        name, raw_labels, value = m.groups()
        labels = []
        if raw_labels:
            pos = 0
            while pos < len(raw_labels):
                lm = LABEL_RE.match(raw_labels, pos)
                assert lm, f"bad labels at {raw_labels[pos:]!r} in {line!r}"
                unescaped = (
                    lm.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
                )
                labels.append((lm.group(1), unescaped))
                pos = lm.end()
        samples[(name, frozenset(labels))] = float(value)
    return samples, types


def scrape(server_url: str) -> Tuple[Samples, Dict[str, str]]:
    r = httpx.get(f"{server_url}/metrics", timeout=30)
    assert r.status_code == 200, f"GET /metrics: {r.status_code} {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/openmetrics-text"), r.headers
    return parse_openmetrics(r.text)


def value(samples: Samples, name: str, **labels: str) -> Optional[float]:
    """The value of the one sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(found) <= 1, f"{len(found)} samples of {name} match {labels}"
    return found[0] if found else None


def test_metrics_after_commands(server_url, new_sandbox):
    before, _ = scrape(server_url)
    ran_before = value(before, "e2b_executions_total", kind="command") or 0
    failed_before = value(before, "e2b_executions_failed_total", kind="command") or 0

    sbx = new_sandbox()
    assert sbx.commands.run("true").exit_code == 0
    with pytest.raises(CommandExitException):
        sbx.commands.run("false")

    # An execution is counted when its answer ends, which may be a moment after the
    # SDK has returned.
    samples: Samples = {}
    types: Dict[str, str] = {}

    def counted() -> bool:
        nonlocal samples, types
        samples, types = scrape(server_url)
        ran = value(samples, "e2b_executions_total", kind="command") or 0
        failed = value(samples, "e2b_executions_failed_total", kind="command") or 0
        return ran - ran_before >= 2 and failed - failed_before >= 1

    assert wait_until(counted, timeout=10, interval=0.5), (
        f"commands not counted: executions {ran_before} -> "
        f"{value(samples, 'e2b_executions_total', kind='command')}, failed {failed_before} -> "
        f"{value(samples, 'e2b_executions_failed_total', kind='command')}"
    )

    active = value(samples, "e2b_sandboxes_active")
    assert active is not None and active >= 1, active
    created = value(samples, "e2b_sandboxes_created_total")
    assert created is not None and created >= 1, created
    memory = value(samples, "e2b_sandbox_memory_bytes", sandbox_id=sbx.sandbox_id)
    assert memory is not None and memory > 0, (
        f"no memory sample for {sbx.sandbox_id}: "
        f"{[k for k in samples if k[0] == 'e2b_sandbox_memory_bytes']}"
    )
    assert value(samples, "e2b_sandbox_memory_bytes", sandbox_id=sbx.sandbox_id, template="base")
    count = value(samples, "e2b_execution_duration_seconds_count", kind="command")
    assert count is not None and count >= 2, count
    inf = value(samples, "e2b_execution_duration_seconds_bucket", kind="command", le="+Inf")
    assert inf == count

    # The seed's families, with the types the dashboard and alerts assume.
    for name, kind in {
        "e2b_sandboxes_active": "gauge",
        "e2b_sandboxes_created": "counter",
        "e2b_executions": "counter",
        "e2b_executions_failed": "counter",
        "e2b_execution_duration_seconds": "histogram",
        "e2b_sandbox_memory_bytes": "gauge",
    }.items():
        assert types.get(name) == kind, f"# TYPE {name}: {types.get(name)}, expected {kind}"


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_prometheus_scrapes_kiln(server_url, new_sandbox, tmp_path):
    assert os.access(PROMETHEUS, os.X_OK), (
        f"{PROMETHEUS} not found: install Debian's prometheus package (scripts/install-deps.sh)"
    )
    target = urlsplit(server_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        f"rule_files: ['{ALERTS}']\n"
        "scrape_configs:\n"
        "  - job_name: kiln\n"
        "    metrics_path: /metrics\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_loopback_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    def get(path: str, **params) -> dict:
        r = httpx.get(f"{api}/{path}", params=params, timeout=5)
        assert r.status_code == 200, f"GET /api/v1/{path} {params}: {r.status_code} {r.text[:500]}"
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    try:
        targets: list = []

        def target_up() -> bool:
            nonlocal targets
            assert prom.poll() is None, f"prometheus exited ({prom.returncode}):\n{log_tail()}"
            try:
                targets = get("targets")["activeTargets"]
            except httpx.HTTPError:
                return False  # not listening yet
            return any(t["health"] == "up" for t in targets)

        assert wait_until(target_up, timeout=30, interval=0.5), (
            f"the kiln target is not up in Prometheus: {targets}\n{log_tail()}"
        )

        new_sandbox()
        new_sandbox()
        seen: list = []

        def two_active() -> bool:
            nonlocal seen
            seen = get("query", query=f'e2b_sandboxes_active{{job="kiln",instance="{target}"}}')[
                "result"
            ]
            return bool(seen) and float(seen[0]["value"][1]) >= 2

        assert wait_until(two_active, timeout=30, interval=1), (
            f"e2b_sandboxes_active never reached 2 in Prometheus: {seen}"
        )

        # Every query of the Grafana dashboard evaluates (Grafana's variables replaced).
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        assert exprs
        for expr in exprs:
            for var, val in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, val)
            get("query", query=expr)
        memory = get("query", query=f'topk(10, e2b_sandbox_memory_bytes{{instance="{target}"}})')
        assert len(memory["result"]) >= 2, memory

        # Kiln's alert rules load and evaluate against the real series without error.
        groups = []

        def rules_evaluated() -> bool:
            nonlocal groups
            groups = get("rules")["groups"]
            rules = [r for g in groups if g["name"] == "kiln" for r in g["rules"]]
            return len(rules) == 3 and all(r["health"] != "unknown" for r in rules)

        assert wait_until(rules_evaluated, timeout=15, interval=0.5), groups
        rules = [r for g in groups if g["name"] == "kiln" for r in g["rules"]]
        assert sorted(r["name"] for r in rules) == [
            "KilnExecutionFailureRateHigh",
            "KilnSandboxMemoryHigh",
            "KilnTooManyActiveSandboxes",
        ]
        for r in rules:
            assert r["health"] == "ok", f"{r['name']}: {r['health']} {r.get('lastError')}"
    finally:
        stop_process(prom, 15)
