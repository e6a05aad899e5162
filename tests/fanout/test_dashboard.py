"""The dashboard in a real browser: a whole node (web, monitor, router, publisher,
store, fanout) with a device registry and simulated devices, the page opened in
Debian's chromium driven by Playwright, assertions on what it shows.

A screenshot goes to the test's tmp dir; set ``IOTNODE_DASHBOARD_SCREENSHOT=PATH``
to copy it there too (``docs/dashboard.png`` was made that way).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from playwright import sync_api

from node.auth import issue_client_token, issue_device_token
from tests.metrics.conftest import SECRET, Node, start_node
from tests.support import private_processes, wait_until

CHROMIUM = Path("/usr/bin/chromium")
OPT_OUT = "IOTNODE_BROWSER_OPTOUT"  # "1": skip the browser tests on a machine without chromium


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    """No silent skip: without Debian's chromium (``.ci/run`` installs it) the tests fail,
    unless the opt-out variable says so explicitly."""
    if not CHROMIUM.exists():
        why = f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get(OPT_OUT) == "1":
            pytest.skip(f"{why} ({OPT_OUT}=1)")
        pytest.fail(f"{why}; set {OPT_OUT}=1 to skip the browser tests")


BROWSER_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

REGISTRY_CSV = """device_id,type,class,region,site,lat,lon,floor
temp-1,thermometer,env,north,hall-a,52.52,13.40,1
temp-2,thermometer,env,north,hall-b,52.53,13.43,2
temp-3,thermometer,env,south,yard,48.14,11.58,
pump-1,pump,actuator,south,plant-1,48.13,11.55,
pump-2,pump,actuator,south,plant-2,48.16,11.61,
secret-1,thermometer,env,north,vault,52.50,13.39,
"""
IN_REGISTRY = ["temp-1", "temp-2", "temp-3", "pump-1", "pump-2"]
ALLOWED = [*IN_REGISTRY, "misc-7"]  # misc-7 is not in the registry: grouped by its id prefix
DEVICES = [*ALLOWED, "secret-1"]  # secret-1 sends too, but the token does not allow it
SEND_EVERY = 0.2  # seconds between a device's messages


class Devices:
    """Simulated devices in a background thread (own event loop), until stopped."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.stopping = threading.Event()
        self.sent: dict[str, int] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="devices", daemon=True)
        self.thread.start()

    async def _device(self, device_id: str, phase: float) -> None:
        async with self.node.connect(device_id) as ws:

            async def drain() -> None:
                async for _ in ws:  # acks: read them so the window never fills
                    pass

            reader = asyncio.ensure_future(drain())
            seq = 0
            try:
                while not self.stopping.is_set():
                    t = time.time()
                    if device_id.startswith("pump"):
                        data: dict[str, Any] = {"rpm": round(1500 + 300 * math.sin(t + phase), 1), "on": True}
                    else:
                        data = {
                            "temp": round(20 + 3 * math.sin(t / 2 + phase), 2),
                            "hum": round(45 + 8 * math.cos(t / 3), 1),
                        }
                    await ws.send(json.dumps({"seq": seq, "ts": t, "data": data}))
                    self.sent[device_id] = seq = seq + 1
                    await asyncio.sleep(SEND_EVERY)
            finally:
                reader.cancel()

    def _run(self) -> None:
        async def main() -> None:
            await asyncio.gather(*(self._device(d, i) for i, d in enumerate(DEVICES)))

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the fixture
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with private_processes(tmp_path_factory, "dash") as (root, data_dir, group):
        registry = root / "registry.csv"
        registry.write_text(REGISTRY_CSV)
        node = start_node(data_dir, root, group, NODE_DEVICE_REGISTRY=registry, NODE_LOG_LEVEL="warning")
        devices = Devices(node)
        try:
            wait_until(lambda: len(devices.sent) == len(DEVICES), 20, what="every device sending")
            yield node
        finally:
            devices.stop()
            node.client.close()
        assert devices.error is None, f"device simulator failed: {devices.error!r}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def base_url(node: Node) -> str:
    return f"http://127.0.0.1:{node.port('fanout')}"


def number(text: str) -> float:
    return float(text.split()[0].replace(",", ""))


def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None,
    )
    page.goto(url)
    return page, problems


def test_page_shows_the_tokens_devices_live_with_groups_map_and_node_health(
    node: Node, browser: Any, tmp_path: Path
) -> None:
    token = issue_client_token(SECRET, ALLOWED, ttl=600)
    page, problems = open_page(browser, f"{base_url(node)}/?token={token}")
    expect = sync_api.expect
    expect(page.locator("#status")).to_have_text("live", timeout=15_000)
    assert "token=" not in page.url  # taken out of the address bar at once

    # every allowed device, and only those
    expect(page.locator("#device-count")).to_have_text(str(len(ALLOWED)), timeout=10_000)
    for device_id in ALLOWED:
        expect(page.locator(f'.device[data-device="{device_id}"] .value')).to_contain_text(
            '"', timeout=10_000
        )
    time.sleep(1.5)  # secret-1 has been sending all along
    assert page.locator('[data-device="secret-1"]').count() == 0
    assert "secret-1" not in page.content()

    # a value that changes
    value = page.locator('.device[data-device="temp-1"] .value')
    first = value.inner_text()
    assert '"temp"' in first
    wait_until(lambda: value.inner_text() != first, 10, 0.2, "temp-1's value to change")
    assert page.locator('.device[data-device="temp-1"] svg.spark polyline').count() == 2  # temp, hum

    # grouped by registry type · class · region; misc-7 by its id prefix
    groups = page.locator("section.group")
    names = [groups.nth(i).get_attribute("data-group") for i in range(groups.count())]
    assert names == [
        "prefix misc",
        "pump · actuator · south",
        "thermometer · env · north",
        "thermometer · env · south",
    ]
    north = page.locator('section.group[data-group="thermometer · env · north"] .device')
    assert north.count() == 2
    assert page.locator("#stale-count").inner_text() == "0"

    # the map: one dot per allowed device with a position
    assert page.locator("#map circle").count() == len(IN_REGISTRY)
    assert page.locator('#map circle[data-device="secret-1"]').count() == 0

    # node health from the processes' metrics, non-zero
    def health_numbers() -> bool:
        try:
            return (
                number(page.locator("#h-acks").inner_text()) > 0
                and number(page.locator("#h-stored").inner_text()) > 0
            )
        except ValueError:
            return False

    wait_until(health_numbers, 15, 0.25, "acks/s and stored/s shown")
    assert number(page.locator("#h-p99").inner_text()) > 0
    assert number(page.locator("#h-conns").inner_text()) >= len(DEVICES)
    assert number(page.locator("#h-clients").inner_text()) >= 1
    expect(page.locator("#h-procs")).to_have_text("6/6 up")
    assert page.locator("#h-ingress-fill").inner_text().endswith("% full")

    # the filter box: by registry field or label
    page.locator("#filter").fill("pump")
    expect(page.locator(".device")).to_have_count(2)
    page.locator("#filter").fill("floor=2")
    expect(page.locator(".device")).to_have_count(1)
    expect(page.locator(".device")).to_have_attribute("data-device", "temp-2")
    page.locator("#filter").fill("")
    expect(page.locator(".device")).to_have_count(len(ALLOWED))

    target = os.environ.get("IOTNODE_DASHBOARD_SCREENSHOT")
    if target:  # for the README: let the sparklines fill first
        time.sleep(10)
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if target:
        shutil.copyfile(shot, target)
    assert problems == []  # no script error, no CSP violation
    page.close()


def test_a_star_token_streams_every_device_and_a_device_gone_quiet_is_marked_stale(
    node: Node, browser: Any
) -> None:
    page, problems = open_page(
        browser, f"{base_url(node)}/dashboard?token={issue_client_token(SECRET, ['*'])}"
    )
    sync_api.expect(page.locator("#status")).to_have_text("live", timeout=15_000)
    # the registry's six devices and misc-7 as soon as it sends
    sync_api.expect(page.locator("#device-count")).to_have_text("7", timeout=10_000)
    sync_api.expect(page.locator('.device[data-device="secret-1"] .value')).to_contain_text(
        "temp", timeout=10_000
    )
    # a registry device that never sent is stale from the start
    page.evaluate(
        """() => { state.contexts.set('ghost-1', {device_id: 'ghost-1', type: 'pump', class: 'actuator',
        region: 'south', site: 'x', lat: 48.1, lon: 11.5, geohash: '', labels: {}});
        device('ghost-1'); render(); }"""
    )
    sync_api.expect(page.locator('.device.stale[data-device="ghost-1"] .age')).to_have_text("never")
    sync_api.expect(page.locator("#stale-count")).to_have_text("1")
    assert page.locator("#map circle.stale").count() == 1
    assert problems == []
    page.close()


def test_a_bad_or_expired_token_shows_a_clear_message_and_no_data(node: Node, browser: Any) -> None:
    with warnings.catch_warnings():  # the test secret is shorter than PyJWT likes
        warnings.simplefilter("ignore")
        expired = jwt.encode({"sub": "c", "devices": ["*"], "exp": int(time.time()) - 60}, SECRET, "HS256")
    for token, says in (
        ("not-a-jwt", "Token refused: malformed token"),
        (expired, "Token refused: token expired"),
        (issue_device_token(SECRET, "temp-1"), "Access refused: token has no 'devices' claim"),
    ):
        page, _ = open_page(browser, f"{base_url(node)}/?token={token}")
        sync_api.expect(page.locator("#message")).to_contain_text(says, timeout=10_000)
        assert page.locator("#login").is_visible() and not page.locator("#main").is_visible()
        assert page.locator(".device").count() == 0
        page.close()
    # a token that expires while the page is open: the stream ends (1008), the page says so
    page, _ = open_page(browser, f"{base_url(node)}/?token={issue_client_token(SECRET, ['temp-1'], ttl=3)}")
    sync_api.expect(page.locator("#status")).to_have_text("live", timeout=10_000)
    sync_api.expect(page.locator("#message")).to_contain_text("Token refused: token expired", timeout=10_000)
    assert page.locator("#login").is_visible() and not page.locator("#main").is_visible()
    page.close()
    # the login form works with a good token
    page, problems = open_page(browser, f"{base_url(node)}/")
    assert page.locator("#login").is_visible()
    page.locator("#token-input").fill(issue_client_token(SECRET, ["pump-1"]))
    page.locator("#login button").click()
    sync_api.expect(page.locator("#device-count")).to_have_text("1", timeout=10_000)
    sync_api.expect(page.locator('.device[data-device="pump-1"] .value')).to_contain_text(
        "rpm", timeout=10_000
    )
    assert problems == []
    page.close()


def test_data_endpoints_check_the_token_and_return_only_allowed_devices(node: Node) -> None:
    url = base_url(node)
    with httpx.Client(timeout=10) as http:
        page = http.get(f"{url}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert http.get(f"{url}/static/dashboard.js").status_code == 200
        for path in ("/v1/devices", "/v1/health"):
            refused = http.get(url + path)
            assert refused.status_code == 401 and "missing token" in refused.json()["error"]
            device_token = issue_device_token(SECRET, "temp-1")
            assert (
                http.get(url + path, headers={"Authorization": f"Bearer {device_token}"}).status_code == 403
            )
        token = issue_client_token(SECRET, ["temp-1", "nobody-9"])
        body = http.get(f"{url}/v1/devices", headers={"Authorization": f"Bearer {token}"}).json()
        assert body["allowed"] == ["nobody-9", "temp-1"] and body["registry"] is True
        by_id = {d["device_id"]: d for d in body["devices"]}
        assert set(by_id) == {"temp-1", "nobody-9"}
        assert by_id["temp-1"]["site"] == "hall-a" and by_id["temp-1"]["lat"] == 52.52
        assert by_id["temp-1"]["labels"] == {"floor": "1"} and by_id["temp-1"]["geohash"].startswith("u33")
        assert by_id["nobody-9"]["type"] == "unknown"
        # health: one scrape a second at most, shared by every caller
        headers = {"Authorization": f"Bearer {token}"}
        first = http.get(f"{url}/v1/health", headers=headers).json()
        again = http.get(f"{url}/v1/health", headers=headers).json()
        assert again["time"] == first["time"]
        assert all(p["up"] for p in first["processes"].values()), first["processes"]
        assert set(first["processes"]) == {"web", "monitor", "router", "publisher", "store", "fanout"}
        time.sleep(1.1)
        later = http.get(f"{url}/v1/health", headers=headers).json()
        assert later["time"] > first["time"] and later["rates"]["acked"] > 0
