"""telemetry.snapshot against a real Prometheus: it scrapes a registry this test serves (two of
the dashboard's metrics moving for a few seconds) and the dashboard is drawn from its API."""

import json
import re
import time

from PIL import Image
from prometheus_client import CollectorRegistry, start_http_server

from telemetry.metrics import create
from telemetry.snapshot import DASHBOARD, dashboard_panels, render_dashboard
from tests.conftest import free_port, start_prometheus

SERVED = {"fmrl_reward_mean", "fmrl_iterations_total"}


def test_dashboard_is_drawn_from_a_real_prometheus(tmp_path):
    registry = CollectorRegistry()
    reward, iterations = create("fmrl_reward_mean", registry), create("fmrl_iterations_total", registry)
    reward.labels(reward="total").set(0.1)
    target = free_port()
    server, _ = start_http_server(target, addr="127.0.0.1", registry=registry)
    prom = start_prometheus(tmp_path / "prometheus", {"fmrl-test": [f"127.0.0.1:{target}"]})
    try:
        prom.wait_scraped()
        start = time.time()
        for i in range(12):
            reward.labels(reward="total").set(0.1 + 0.05 * i)
            iterations.inc()
            time.sleep(0.5)
        time.sleep(1.2)  # the last values scraped
        end = time.time()
        counts = render_dashboard(prom.url, start, end, tmp_path / "dashboard.png", step=1)
    finally:
        prom.stop()
        server.shutdown()
        server.server_close()

    with Image.open(tmp_path / "dashboard.png") as im:
        im.verify()
    with Image.open(tmp_path / "dashboard.png") as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 800, (im.format, im.size)
    panels = dashboard_panels(json.loads(DASHBOARD.read_text()))
    assert set(counts) == {p["title"] for p in panels}
    for p in panels:
        names = {n for t in p["targets"] for n in re.findall(r"\bfmrl_[a-z0-9_]+", t["expr"])}
        if names & SERVED:
            assert counts[p["title"]] >= 1, (p["title"], counts)
        else:
            assert counts[p["title"]] == 0, (p["title"], counts)
