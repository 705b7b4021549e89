"""Prometheus end to end: promtool on the textfile and on deploy/prometheus/gua-rules.yml, then the
real Debian prometheus and prometheus-node-exporter scraping a running collector, the shipped alerts
firing (and stopping when the collector stops) and every Grafana panel's query returning data.

Needs the binaries of Debian's prometheus and prometheus-node-exporter packages (.ci/run installs
them; their services need not run: the test starts its own on free loopback ports, with temporary
config and storage, and stops them). Without them the tests skip and say why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collector_helpers import clean_env
from gua_collector.clock import SimClock
from gua_collector.records import Tick
from gua_collector.sampler import Sampler
from gua_collector.simulate import SimBackend
from gua_collector.textfile import Textfile

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "gua-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "tests" / "gua-rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "gua.json"
PACKAGES = {"promtool": "prometheus", "prometheus": "prometheus", "prometheus-node-exporter": "prometheus-node-exporter"}
# Monday 2 March 2026, 11:00 UTC in the lab scenario: GPU 0 trains (alice), GPU 1 is idle-held by
# bob's notebook (until 12:00), GPU 2 runs carol's duty cycle beside bob's idle 2 GB, GPU 3 only Xorg.
SIM_AT_MS = 1_772_449_200_000
INTERVAL_S = 2  # the simulated driver samples every 2 s: shorter ticks would often see no sample


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install --no-install-recommends "
                    f"{PACKAGES[name]}; .ci/run does)")
    return path


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)


# --- promtool: the textfile, the rules ----------------------------------------------------------

def _ticks(scenario: str, count: int, start_ms: int = SIM_AT_MS) -> Iterator[Tick]:
    clock = SimClock(start_ms)
    backend = SimBackend(scenario, clock)
    backend.init()
    sampler = Sampler(backend)
    for n in range(count):
        yield sampler.tick(clock.wall_ms(), 0 if n == 0 else 10_000)
        clock.sleep(10, None)  # type: ignore[arg-type]


def _textfile(scenario: str, users: bool, ticks: int = 3, stopped: bool = False) -> str:
    text = Textfile("unused.prom", users=users, interval_s=10, version="0.1.0", backend=f"simulate:{scenario}")
    out = ""
    for tick in _ticks(scenario, ticks):
        out = text.render(tick)
    return text.render_stopped() if stopped else out


CASES = {
    "lab": lambda: _textfile("lab", users=False),
    "lab, user names": lambda: _textfile("lab", users=True),
    "mig, user names": lambda: _textfile("mig", users=True),
    # 40 simulated minutes: GPU 1 is lost after 30, GPU 2 fails now and then, GPU 0's memory is unknown.
    "faults, user names": lambda: _textfile("faults", users=True, ticks=240),
    "after a clean stop": lambda: _textfile("lab", users=True, stopped=True),
}


@pytest.mark.parametrize("case", CASES)
def test_textfile_passes_promtool_check_metrics(case: str) -> None:
    """Exposition format and Prometheus' naming lint (units, _total, _info): no finding at all."""
    promtool = tool("promtool")
    text = CASES[case]()
    result = run(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_faults_scenario_counts_nvml_errors() -> None:
    metrics = _textfile("faults", users=True, ticks=240)
    lost = re.search(r'^gua_gpu_nvml_errors_total\{gpu="1"\} (\d+)$', metrics, re.M)
    assert lost and int(lost.group(1)) > 0, "the lost GPU's failed ticks are counted"
    assert 'gua_gpu_state{gpu="1",state="unknown"} 1' in metrics
    assert "NaN" not in metrics


def test_rules_pass_promtool_check() -> None:
    result = run(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_rules_unit_tests() -> None:
    """Input series for each alert and recording rule, the freshness guard included (deploy/prometheus/tests)."""
    result = run(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def _alerts(text: str) -> dict[str, str]:
    """alert name -> its block of the rules file."""
    blocks = re.split(r"\n      - (?=alert:|record:)", text)
    return {m.group(1): b for b in blocks if (m := re.match(r"alert: (\w+)", b))}


def test_every_alert_depends_on_the_collector_s_freshness_and_says_what_to_do() -> None:
    alerts = _alerts(RULES.read_text())
    assert set(alerts) == {"GuaGpuIdleHeld", "GuaUserIdleHeld", "GuaCollectorNotRecording", "GuaNvmlErrors"}
    for name, block in alerts.items():
        assert "time() - gua_collector_last_tick_timestamp_seconds" in block, f"{name} has no freshness guard"
        summary = block.split("summary:", 1)[1]
        assert re.search(r"`[^`]+`", summary), f"{name}: the summary names a command to run"


def test_rules_use_only_series_the_collector_writes() -> None:
    written = set(re.findall(r'_Family\("(\w+)"', (REPO / "collector" / "textfile.py").read_text()))
    used = set(re.findall(r"(?<![:\w])(gua_[a-z_]+)\b", RULES.read_text()))  # not inside a recorded name
    assert used <= written, used - written


# --- the real thing: collector -> node_exporter -> Prometheus -----------------------------------

# The collector as installed, but its simulated GPUs live at SIM_AT_MS: the lab scenario follows
# the time of day, and a test must not depend on when it runs. Ticks keep the real time.
COLLECTOR = """
import sys, time
from gua_collector import main, simulate
from gua_collector.clock import RealClock

class ScenarioClock(RealClock):
    offset = int(sys.argv[1]) - time.time_ns() // 1_000_000
    def wall_ms(self):
        return super().wall_ms() + self.offset

main.make_backend = lambda options, clock: simulate.SimBackend(options.backend.split(":", 1)[1], ScenarioClock())
sys.exit(main.main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fast_rules(text: str) -> str:
    """The shipped rules with test-sized windows: 30 s instead of hours, no for:, a 3 s floor."""
    text, windows = re.subn(r"\[(?:15m|1h|2h|4h|1d)\]", "[30s]", text)
    text, holds = re.subn(r"\n        for: \d+m\n", "\n        for: 0s\n", text)
    text, floors = re.subn(r"clamp_min\(3 \* gua_collector_interval_seconds, 120\)",
                           "clamp_min(3 * gua_collector_interval_seconds, 3)", text)
    assert (windows, holds, floors) == (12, 3, 4), "the shipped rules changed shape: update fast_rules"
    return text


class Stack:
    """The processes of one end-to-end run, and Prometheus' HTTP API."""

    def __init__(self, base: Path, stack: contextlib.ExitStack) -> None:
        self.base = base
        self._stack = stack
        self.textfile = base / "textfile" / "gua.prom"
        self.textfile.parent.mkdir()
        self.exporter_port = free_port()
        self.prometheus_port = free_port()
        self.collector: subprocess.Popen[bytes] | None = None

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.base / f"{name}.log", "wb")
        self._stack.callback(log.close)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        self._stack.callback(_stop, proc)
        return proc

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def alerts(self, state: str = "firing") -> list[dict[str, str]]:
        return [a["labels"] for a in self.api("alerts")["alerts"] if a["state"] == state]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL: whatever the test started ends with it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, stack: Stack) -> tuple[Any, float]:
    """Poll until probe() is truthy; return it and the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            value = probe()
        except OSError:
            value = None  # Prometheus not listening yet
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout:
            logs = "\n".join(f"--- {n}\n{stack.log(n)}" for n in ("collector", "node_exporter", "prometheus"))
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(0.25)


def _start_all(stack: Stack) -> None:
    exporter, prometheus = tool("prometheus-node-exporter"), tool("prometheus")
    base = stack.base
    (base / "gua-rules.yml").write_text(fast_rules(RULES.read_text()))
    (base / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - gua-rules.yml\n"
        "scrape_configs:\n  - job_name: node\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{stack.exporter_port}']\n")
    stack.collector = stack.start("collector", [
        sys.executable, "-c", COLLECTOR, str(SIM_AT_MS), "--config", os.devnull, "--db", str(base / "gua.db"),
        "--backend", "simulate:lab", "--interval", f"{INTERVAL_S}s", "--textfile", str(stack.textfile),
        "--textfile-users", "on"], env=clean_env())
    stack.start("node_exporter", [
        exporter, f"--web.listen-address=127.0.0.1:{stack.exporter_port}", "--collector.disable-defaults",
        "--collector.textfile", f"--collector.textfile.directory={stack.textfile.parent}"])
    stack.start("prometheus", [
        prometheus, f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'data'}",
        f"--web.listen-address=127.0.0.1:{stack.prometheus_port}", "--log.level=warn"])


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the dashboard, its variables filled in as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in (("$instance", ".+"), ("$__rate_interval", "30s"), ("$__range", "60s")):
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not fill: {expr}"
            out.append((panel["title"], expr))
    return out


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = {name for _, expr in _panel_queries() for name in re.findall(r"[a-z_:]*gua_[a-z0-9_:]+", expr)}
    recorded = set(re.findall(r"record: (\S+)", RULES.read_text()))
    written = set(re.findall(r'_Family\("(\w+)"', (REPO / "collector" / "textfile.py").read_text()))
    assert used <= recorded | written, used - recorded - written


@pytest.mark.timeout(180)
def test_prometheus_scrapes_the_textfile_and_the_alerts_fire(tmp_path: Path) -> None:
    """collector (simulated GPUs, real write path) -> textfile -> node_exporter -> Prometheus -> rules.

    Then a clean stop: the idle-held alerts must go, the stopped-collector alert must come.
    """
    with contextlib.ExitStack() as resources:
        stack = Stack(tmp_path, resources)
        _start_all(stack)
        started = time.monotonic()

        gpus, took = wait_for("the gua series in Prometheus", lambda: stack.query("gua_gpu_info"), 30, stack)
        print(f"\nfirst gua series in Prometheus {took:.1f} s after start")
        assert sorted(g["metric"]["gpu"] for g in gpus) == ["0", "1", "2", "3"]
        assert {g["metric"]["name"] for g in gpus} == {"NVIDIA H100 80GB HBM3"}
        assert "uuid" not in stack.query("gua_gpu_memory_used_bytes")[0]["metric"], "identity only on gua_gpu_info"
        users = {s["metric"]["user"] for s in stack.query("gua_user_held_seconds_total")}
        assert users == {"alice", "bob", "carol"}

        def gpu_alert() -> list[dict[str, str]]:
            return [a for a in stack.alerts() if a["alertname"] == "GuaGpuIdleHeld"]

        firing, took = wait_for("GuaGpuIdleHeld to fire", gpu_alert, 90, stack)
        print(f"GuaGpuIdleHeld firing {time.monotonic() - started:.1f} s after start")
        assert [a["gpu"] for a in firing] == ["1"], "bob's idle notebook is on GPU 1; nothing else is idle-held"
        user_alert = lambda: [a for a in stack.alerts() if a["alertname"] == "GuaUserIdleHeld"]  # noqa: E731
        users_firing, _ = wait_for("GuaUserIdleHeld to fire", user_alert, 30, stack)
        assert [a["user"] for a in users_firing] == ["bob"], "bob holds GPU 1 and 2 idle; alice and carol work"

        # What was measured: the scrape, the rule evaluations.
        target = stack.api("targets")["activeTargets"][0]
        assert target["health"] == "up", target
        groups = {g["name"]: g for g in stack.api("rules")["groups"]}
        print(f"scrape of node_exporter: {1000 * target['lastScrapeDuration']:.1f} ms; rule groups: "
              + ", ".join(f"{n} {1000 * g['evaluationTime']:.2f} ms" for n, g in sorted(groups.items())))
        assert all(r["health"] == "ok" for g in groups.values() for r in g["rules"]), groups

        empty = [(title, expr) for title, expr in _panel_queries() if not stack.query(expr)]
        assert not empty, f"dashboard panels without data: {empty}"

        # A clean stop invalidates the file: the idle alerts go, the stopped-collector alert comes.
        assert stack.collector is not None
        stack.collector.send_signal(signal.SIGTERM)
        assert stack.collector.wait(timeout=15) == 0, stack.log("collector")
        stopped = time.monotonic()
        text = stack.textfile.read_text()
        assert "gua_collector_last_tick_timestamp_seconds" in text and "gua_gpu_" not in text

        def only_stopped() -> bool:
            names = {a["alertname"] for a in stack.alerts()}
            return names == {"GuaCollectorNotRecording"}

        wait_for("only GuaCollectorNotRecording to fire after the stop", only_stopped, 30, stack)
        print(f"after a clean stop: idle alerts gone and GuaCollectorNotRecording firing in "
              f"{time.monotonic() - stopped:.1f} s")


def test_fast_rules_keep_the_guard() -> None:
    """The test copy differs in durations only: every guard survives the rewrite."""
    fast = fast_rules(RULES.read_text())
    for name, block in _alerts(fast).items():
        assert "time() - gua_collector_last_tick_timestamp_seconds" in block, name
