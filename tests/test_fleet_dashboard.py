"""The fleet view through the gateway's own HTTP port: three real tiny-model replicas (processes, two regions,
tests/fleet_support.py), a fleet router and the gateway over it on loopback. Requests go through the gateway; then
`GET /fleet` is rendered in headless Chromium (its script polls `/fleet.json`) and the rendered DOM must list every
replica under its region with the figures `/fleet.json` holds; a SIGKILLed replica must show as ejected. `GET /metrics`
carries the fleet's series beside the gateway's. Every wait is bounded.

Needs a Chromium binary (Debian's `chromium` package, /usr/bin/chromium); the module is skipped without one.
"""

from __future__ import annotations

import asyncio
import html.parser
import json
import re
import shutil
import signal
import subprocess
import tempfile
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.config import ReplicaSpec
from fleet.router import Router, RouterConfig
from gateway.backend import GrpcReplica
from gateway.open_gate import OpenGate
from gateway.server import Gateway, GatewayConfig
from tests.fleet_support import Child, start_replicas, wait_until

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium, gives /usr/bin/chromium)"
)

REGIONS = ("eu", "eu", "us")
PRICES = (1.5, 1.5, 0.75)  # per chip-hour, 2 chips each
# 70 bytes (byte-level tokens): one whole 64-token page that a repeat of the prompt finds in the prefix cache
PROMPTS = [f"user {i:02d} asks: tell me about the fleet, its regions and replicas, ok?" for i in range(4)]
# probes often; a generous probe deadline, so a busy machine does not eject a live replica (a killed one is refused at
# once)
FAST = RouterConfig(poll_period=0.2, probe_timeout=5.0)
RENDER_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> list[Child]:
    children = start_replicas(3, str(tmp_path_factory.mktemp("fleet")))
    yield children
    for child in children:
        child.stop()


def specs(children: list[Child]) -> list[ReplicaSpec]:
    return [
        ReplicaSpec(name=f"r{i}", address=c.address, region=REGIONS[i], price_per_chip_hour=PRICES[i], chips=2)
        for i, c in enumerate(children)
    ]


# ----- rendering and reading the page -------------------------------------------------------------------------------


async def render(url: str) -> str:
    """The page's DOM after its script ran in headless Chromium for 3 s of virtual time (about three polls)."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            url,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), RENDER_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class Page(html.parser.HTMLParser):
    """What the dashboard rendered: replica rows (their region section, state and figure cells), the fleet's total
    cards and the poll count. Each figure is (raw value from data-value, text shown)."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.polls = 0
        self.rows: dict[str, dict[str, Any]] = {}
        self.totals: dict[str, tuple[Any, str]] = {}
        self._region: str | None = None
        self._row: dict[str, Any] | None = None
        self._cell: list[Any] | None = None  # [field, value, text parts]
        self._card: list[Any] | None = None  # [field, value, text parts of its number]
        self._in_number = False
        self.feed(dom)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.polls = int(a.get("data-polls") or 0)
        elif tag == "section" and a.get("class") == "region":
            self._region = a["data-region"]
        elif tag == "tr" and "data-replica" in a:
            self._row = {"section": self._region, "region": a["data-region"], "state": a["data-state"], "cells": {}}
            self.rows[a["data-replica"]] = self._row
        elif tag == "td" and self._row is not None and "data-field" in a:
            self._cell = [a["data-field"], json.loads(a["data-value"]), []]
        elif tag == "div" and self._card is not None:
            self._in_number = a.get("class") == "num"
        elif tag == "div" and "data-total" in a:
            self._card = [a["data-total"], json.loads(a["data-value"]), []]

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._region = None
        elif tag == "tr":
            self._row = None
        elif tag == "td" and self._cell is not None:
            field, value, parts = self._cell
            self._row["cells"][field] = (value, "".join(parts).strip())
            self._cell = None
        elif tag == "div" and self._card is not None:
            if self._in_number:  # a card's label and number are divs in it
                self._in_number = False
            elif self._card[2]:
                field, value, parts = self._card
                self.totals[field] = (value, "".join(parts).strip())
                self._card = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[2].append(data)
        if self._card is not None and self._in_number:
            self._card[2].append(data)


_STABLE = ("name", "region", "state", "routed", "in_flight", "kv_pages_total", "prompt_tokens", "cached_tokens")


def stable(snapshot: dict[str, Any]) -> list[tuple]:
    """The figures that do not move while the fleet is idle (requests/s decays, load gauges are re-polled)."""
    return [tuple(r[k] for k in _STABLE) for r in snapshot["replicas"]] + [(snapshot["totals"]["routed"],)]


async def rendered_with_snapshot(client: httpx.AsyncClient, base: str) -> tuple[Page, dict[str, Any]]:
    """The rendered page and the /fleet.json it showed: the same before and after rendering, on the stable figures,
    so the page cannot have seen anything else (rendered again, up to 3 times, when the fleet moved meanwhile)."""
    for _ in range(3):
        before = (await client.get("/fleet.json")).json()
        page = Page(await render(f"{base}/fleet"))
        after = (await client.get("/fleet.json")).json()
        if stable(before) == stable(after):
            assert page.polls >= 1, "the page's script never polled /fleet.json"
            return page, after
    raise AssertionError(f"the fleet kept moving while the page rendered: {stable(before)} -> {stable(after)}")


def assert_page_shows(page: Page, snapshot: dict[str, Any]) -> None:
    assert set(page.rows) == {r["name"] for r in snapshot["replicas"]}
    for r in snapshot["replicas"]:
        row = page.rows[r["name"]]
        assert row["section"] == row["region"] == r["region"], (r["name"], row)
        assert row["state"] == r["state"]
        cells = row["cells"]
        assert cells["name"][1].startswith(r["name"]) and r["address"] in cells["name"][1]
        assert cells["state"][1].startswith(r["state"])
        assert cells["routed"] == (r["routed"], str(r["routed"]))
        assert cells["in_flight"] == (r["in_flight"], str(r["in_flight"]))
        assert cells["kv_pages_used"][1] == f"{cells['kv_pages_used'][0]} / {r['kv_pages_total']}"
        assert cells["hit_rate"] == (r["hit_rate"], f"{100 * r['hit_rate']:.1f}%")
        assert cells["cost_per_hour"] == (r["cost_per_hour"], f"${r['cost_per_hour']:.2f}/h")
        assert cells["ejections"] == (r["ejections"], str(r["ejections"]))
    totals = snapshot["totals"]
    assert page.totals["up"] == (totals["up"], f"{totals['up']} / {totals['replicas']}")
    assert page.totals["routed"] == (totals["routed"], str(totals["routed"]))
    assert page.totals["hit_rate"] == (totals["hit_rate"], f"{100 * totals['hit_rate']:.1f}%")
    assert page.totals["cost_per_hour"] == (snapshot["cost_per_hour"], f"${snapshot['cost_per_hour']:.2f}/h")
    assert page.totals["shed"][0] == totals["shed"]


# ----- the tests ----------------------------------------------------------------------------------------------------


def test_dashboard_renders_the_running_fleet_in_chromium(replicas):
    async def main():
        router = Router(specs(replicas), FAST)
        gateway = Gateway(router, OpenGate(), GatewayConfig(http_port=0, grpc_port=0))  # the router is a FleetView
        await gateway.start()
        await router.start()
        base = f"http://127.0.0.1:{gateway.http_port}"
        try:
            await wait_until(lambda: all(r["state"] == "up" for r in router.snapshot()["replicas"]), 20, "all up")
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                page_html = (await client.get("/fleet")).text
                assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", page_html)

                model = (await client.get("/v1/models")).json()["data"][0]["id"]

                async def complete(prompt: str) -> dict[str, Any]:
                    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}
                    r = await client.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    return r.json()

                await asyncio.gather(*(complete(p) for p in PROMPTS))
                repeats = [await complete(p) for p in PROMPTS[:2]]  # where the first went: its page is cached
                assert all(r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64 for r in repeats)
                await wait_until(lambda: router.snapshot()["totals"]["in_flight"] == 0, 10, "requests settled")

                page, snap = await rendered_with_snapshot(client, base)
                assert snap["totals"]["routed"] == len(PROMPTS) + 2 and snap["totals"]["hit_rate"] > 0
                assert [r["region"] for r in snap["replicas"]] == ["eu", "eu", "us"]
                assert all(r["state"] == "up" and r["kv_pages_total"] > 0 for r in snap["replicas"])
                assert_page_shows(page, snap)
                assert page.totals["cost_per_hour"][1] == "$7.50/h"  # 2 chips x (1.5 + 1.5 + 0.75)

                # one scrape of the gateway's /metrics sees the fleet's series too, with the same counts
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families((await client.get("/metrics")).text)
                    for s in family.samples
                }
                assert any(name == "meshserve_gateway_requests_total" for name, _ in samples)
                for r in snap["replicas"]:
                    labels = (("region", r["region"]), ("replica", r["name"]))
                    assert samples[("meshserve_fleet_requests_routed_total", labels)] == r["routed"]

                # a replica killed: ejected, and the page says so (still under its region, costing nothing)
                replicas[1].process.send_signal(signal.SIGKILL)
                await wait_until(lambda: router.snapshot()["replicas"][1]["state"] == "ejected", 10, "r1 ejected")
                page, snap = await rendered_with_snapshot(client, base)
                assert_page_shows(page, snap)
                row = page.rows["r1"]
                assert row["state"] == "ejected" and row["section"] == "eu"
                assert row["cells"]["state"][1].startswith("ejected")
                assert row["cells"]["cost_per_hour"][1] == "$0.00/h"
                assert page.totals["up"][1] == "2 / 3"
        finally:
            await gateway.stop()

    asyncio.run(main())


def test_a_gateway_over_one_replica_has_no_fleet_view():
    async def main():
        gateway = Gateway(GrpcReplica("127.0.0.1:1"), OpenGate(), GatewayConfig(http_port=0, grpc_port=0))
        assert gateway.fleet is None
        await gateway.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as client:
                for path in ("/fleet", "/fleet.json"):
                    assert (await client.get(path)).status_code == 404
                assert "meshserve_fleet_" not in (await client.get("/metrics")).text
        finally:
            await gateway.stop()

    asyncio.run(main())
