# -*- test-case-name: tests.test_dashboard -*-
"""
The dashboard (issue 13) in a real browser: the real service on loopback
ports, a simulated thermostat against it, and Debian's headless Chromium
driven by Playwright for Python.

Playwright's synchronous API blocks, so each browser session runs in a
thread while the reactor serves; the session reaches the reactor's objects
(the simulated thermostat) with C{blockingCallFromThread}. Every request
the page makes is recorded, and a test fails if one leaves the control
port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any, cast

import treq
from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.web.client import Agent

from nestproto.history import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    History,
    HistoryService,
    Sample,
    Transition,
)
from nestproto.service import CONTROL_TOKEN_FILE
from nestproto.simulator import SimulatedThermostat

from .e2e import LiveServiceTestCase, sleep
from .helpers import SERIAL

CHROMIUM = "/usr/bin/chromium"
TOKEN = "dashboard-token-0123456789"
PASSWORD = "correct horse battery"
SHARED = f"shared.{SERIAL}"

try:
    from playwright.sync_api import Page, sync_playwright

    PLAYWRIGHT = True
except ImportError:  # pragma: no cover - reported by _browserMissing
    PLAYWRIGHT = False

#: The reactor, as the thread-side calls see it.
FROM_THREADS = cast(IReactorFromThreads, reactor)


def _browserMissing() -> str | None:
    """Why the browser tests cannot run here, or C{None}."""
    if not PLAYWRIGHT:
        return "Playwright for Python is not installed (pip install '.[test]')"
    if not os.path.exists(CHROMIUM):
        return f"no browser at {CHROMIUM} (apt-get install chromium)"
    return None


class Browsed:
    """What one browser session saw: requests, console errors, screenshots."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.consoleErrors: list[str] = []
        self.answers: list[tuple[str, int]] = []


class DashboardBrowserTests(LiveServiceTestCase):
    """The page in headless Chromium against the real service."""

    timeout = 60

    def setUp(self) -> None:
        missing = _browserMissing()
        if missing is not None:
            if os.environ.get("CI"):
                self.fail(f"browser tests cannot run under CI: {missing}")
            self.skipTest(missing)
        super().setUp()
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.thermostats: list[SimulatedThermostat] = []
        self.shown: dict[str, str] = {}

    async def closeConnections(self) -> None:
        for thermostat in self.thermostats:
            thermostat.stop()
        await super().closeConnections()

    def thermostat(self, device: str) -> SimulatedThermostat:
        def display(serial: str, code: str) -> None:
            self.shown[serial] = code

        thermostat = SimulatedThermostat(
            self.http, reactor, device, SERIAL, changeSeconds=3600, display=display
        )
        self.thermostats.append(thermostat)
        thermostat.start()
        return thermostat

    async def until(self, what: str, condition: Callable[[], Any]) -> None:
        for _attempt in range(250):
            if condition():
                return
            await sleep(0.02)
        self.fail(f"timed out waiting until {what}")

    def history(self) -> History:
        """The history of the service this test started last."""
        root = self.services[-1]
        assert isinstance(root, MultiService)
        (found,) = [s for s in root if isinstance(s, HistoryService)]
        return found.history

    async def pastWeek(self) -> None:
        """
        A week of history before now, as if recorded: a sample every ten
        minutes warming from 18 to 21 degrees each day, and the heater on
        for the first hour of each of the last seven days' mornings.
        """
        history = self.history()
        nowMs = history.nowMs()
        startMs = nowMs - 7 * DAY_MS
        samples = [
            Sample(
                SERIAL,
                timeMs,
                {
                    "temperature": 18.0 + 3 * ((timeMs % DAY_MS) / DAY_MS),
                    "humidity": 40.0,
                    "target": 20.0,
                    "mode": "heat",
                    "eco": "off",
                },
            )
            for timeMs in range(startMs, nowMs - 10 * MINUTE_MS, 10 * MINUTE_MS)
        ]
        transitions = []
        for day in range(7):
            onMs = startMs + day * DAY_MS + 6 * HOUR_MS
            transitions += [
                Transition(SERIAL, onMs, "hvac_heater_state", True),
                Transition(SERIAL, onMs + HOUR_MS, "hvac_heater_state", False),
            ]
        await history.storage.append(samples, transitions)
        await history.maintain()

    def browse(
        self,
        url: str,
        scenario: Callable[[Page, Browsed], None],
        allowedOrigins: tuple[str, ...] = (),
    ) -> Deferred[Browsed]:
        """
        Run C{scenario} in a fresh headless Chromium at C{url} in a thread,
        then check that no request left the control port.
        """
        control = re.match(r"^https?://[^/]+", url)
        assert control is not None
        allowed = (control.group(0) + "/", *allowedOrigins)
        browsed = Browsed()

        def run() -> Browsed:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
                )
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    page.set_default_timeout(5000)
                    page.on("request", lambda r: browsed.requests.append(r.url))
                    page.on(
                        "response",
                        lambda r: browsed.answers.append((r.url, r.status)),
                    )
                    page.on(
                        "console",
                        lambda m: (
                            browsed.consoleErrors.append(m.text)
                            if m.type == "error"
                            else None
                        ),
                    )
                    page.on("pageerror", lambda e: browsed.consoleErrors.append(str(e)))
                    page.goto(url)
                    scenario(page, browsed)
                finally:
                    browser.close()
            return browsed

        def check(browsed: Browsed) -> Browsed:
            outside = [
                one
                for one in browsed.requests
                if not one.startswith(allowed) and not one.startswith("data:")
            ]
            self.assertEqual(outside, [], "the page requested outside the server")
            return browsed

        return deferToThread(run).addCallback(check)

    def screenshots(self, page: Page, name: str) -> None:
        """The page at 1280 px and at 360 px, into the test's directory."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for width in (1280, 360):
            page.set_viewport_size({"width": width, "height": 900})
            page.screenshot(
                path=os.path.join(directory, f"{name}-{width}.png"), full_page=True
            )
        page.set_viewport_size({"width": 1280, "height": 900})
        keep = os.environ.get("DASHBOARD_SCREENSHOTS")
        if keep:
            shutil.copytree(directory, keep, dirs_exist_ok=True)

    # The tests

    def test_thermostatLive(self) -> Deferred[None]:
        """
        The page loads with no console errors and shows the empty state; a
        simulated thermostat appears; raising its setpoint in the page
        reaches the thermostat's held subscribe; a change the thermostat
        puts shows without a reload; only the modes its wiring allows are
        offered.
        """

        async def go() -> None:
            device, control = await self.start()
            began = time.monotonic()

            def scenario(page: Page, browsed: Browsed) -> None:
                empty = page.get_by_text("No thermostat has connected yet")
                empty.wait_for()
                assert re.search(
                    r"point it at http://127\.0\.0\.1:\d+/entry", empty.inner_text()
                )
                assert page.get_by_role("status").first.inner_text() == "Live"
                thermostat = blockingCallFromThread(
                    FROM_THREADS, self.thermostat, device
                )
                card = page.get_by_role("article", name=SERIAL)
                card.wait_for()
                card.get_by_text("Target 20.0 °C").wait_for()
                card.get_by_text("Now 20.0 °C · humidity 40 %").wait_for()
                # Heat only: can_cool is false, no emergency heat.
                modes = card.get_by_role("group", name="Mode")
                assert modes.get_by_role("button", name="Heat", exact=True).is_visible()
                assert modes.get_by_role("button", name="Off").is_visible()
                assert not modes.get_by_role("button", name="Cool").is_visible()
                assert not modes.get_by_role("button", name="Heat·Cool").is_visible()
                assert (
                    modes.get_by_role("button", name="Heat", exact=True).get_attribute(
                        "aria-pressed"
                    )
                    == "true"
                )
                # Keyboard: focus the raise button and press Enter.
                card.get_by_role("button", name="Raise target").focus()
                page.keyboard.press("Enter")
                card.get_by_text("Target 20.5 °C").wait_for()
                for _ in range(100):
                    value = blockingCallFromThread(
                        FROM_THREADS,
                        lambda: thermostat.buckets[SHARED].value.get(
                            "target_temperature"
                        ),
                    )
                    if value == 20.5:
                        break
                    time.sleep(0.02)
                assert value == 20.5, value
                # The thermostat's own change shows without a reload.
                blockingCallFromThread(
                    FROM_THREADS,
                    thermostat.change,
                    SHARED,
                    {"target_temperature": 22.0},
                )
                card.get_by_text("Target 22.0 °C").wait_for(timeout=1500)
                # An error from the command layer is shown in words.
                page.route(
                    re.compile(r".*/command$"),
                    lambda route: route.continue_(
                        post_data=json.dumps(
                            {"serial": SERIAL, "command": "set_mode", "value": "cool"}
                        )
                    ),
                )
                modes.get_by_role("button", name="Off").click()
                card.get_by_role("alert").get_by_text(
                    "Device cannot cool (can_cool is false)"
                ).wait_for()
                page.unroute(re.compile(r".*/command$"))
                self.screenshots(page, "thermostat")
                errors = [e for e in browsed.consoleErrors if "400" not in e]
                assert errors == [], errors

            await self.browse(control + "/", scenario)
            self.assertLess(time.monotonic() - began, 20)

        return Deferred.fromCoroutine(go())

    def test_pairing(self) -> Deferred[None]:
        """
        The pairing section lists a booted, unclaimed thermostat by serial
        only; its code, typed into the page with an account, claims it. A
        server without history shows no chart.
        """

        async def go() -> None:
            device, control = await self.start("--no-history")
            thermostat = self.thermostat(device)
            await self.until("the code is shown", lambda: SERIAL in self.shown)
            code = self.shown[SERIAL]

            def scenario(page: Page, browsed: Browsed) -> None:
                pairing = page.get_by_role("region", name="Pairing")
                pairing.get_by_role("listitem").filter(has_text=SERIAL).wait_for()
                assert code.replace("-", "") not in page.content().replace("-", "")
                pairing.get_by_role("textbox", name="Entry code").fill(code)
                pairing.get_by_role("textbox", name="Account").fill("homeowner")
                pairing.get_by_role("button", name="Claim thermostat").click()
                pairing.get_by_text(
                    f"Device {SERIAL} registered to homeowner"
                ).wait_for()
                page.get_by_role("article", name=SERIAL).get_by_text(
                    "account homeowner"
                ).wait_for()
                # Without history (--no-history) there is simply no chart.
                for _ in range(100):
                    asked = [a for a in browsed.answers if "/api/history?" in a[0]]
                    if asked:
                        break
                    # Playwright delivers events while it is called.
                    page.wait_for_timeout(20)
                assert [status for _, status in asked] == [404], asked
                assert page.get_by_role("region", name="History").count() == 0
                errors = [e for e in browsed.consoleErrors if "404" not in e]
                assert errors == [], errors

            await self.browse(control + "/", scenario)
            await self.until("claimed", lambda: thermostat.owner == "homeowner")

        return Deferred.fromCoroutine(go())

    def test_scheduleRoundTrip(self) -> Deferred[None]:
        """
        A setpoint added in the week view and saved is stored as the
        schedule and shown again after a reload; one out of range is
        refused next to its entry.
        """

        async def go() -> None:
            device, control = await self.start()
            self.thermostat(device)

            def scenario(page: Page, browsed: Browsed) -> None:
                week = page.get_by_role("region", name="Schedule")
                week.get_by_role("button", name="Add setpoint to Tuesday").click()
                week.get_by_role("textbox", name="Tuesday setpoint 1 time").fill(
                    "06:30"
                )
                temperature = week.get_by_role(
                    "spinbutton", name="Tuesday setpoint 1 temperature"
                )
                temperature.fill("40")
                week.get_by_role("button", name="Save schedule").click()
                week.get_by_role("alert").get_by_text(
                    "Temperature must be between"
                ).wait_for()
                temperature.fill("21.5")
                week.get_by_role("button", name="Save schedule").click()
                week.get_by_text("Schedule saved.").wait_for()
                # Move it to Wednesday, save, reload: it is there.
                week.get_by_role(
                    "combobox", name="Tuesday setpoint 1 day"
                ).select_option("2")
                week.get_by_role("button", name="Save schedule").click()
                week.get_by_text("Schedule saved.").wait_for()
                page.reload()
                moved = page.get_by_role("region", name="Schedule").get_by_role(
                    "spinbutton", name="Wednesday setpoint 1 temperature"
                )
                moved.wait_for()
                assert moved.input_value() == "21.5", moved.input_value()

            await self.browse(control + "/", scenario)
            code, stored = await self.json(
                "GET", f"{control}/api/schedule?serial={SERIAL}"
            )
            self.assertEqual(code, 200)
            days = stored["schedule"]["days"]
            self.assertEqual(days["1"], {})
            self.assertEqual(
                days["2"]["0"],
                {
                    "time": 6 * 3600 + 1800,
                    "type": "HEAT",
                    "entry_type": "setpoint",
                    "temp": 21.5,
                },
            )

        return Deferred.fromCoroutine(go())

    def test_loginAndCrossSite(self) -> Deferred[None]:
        """
        With a control token the page asks to log in; the session cookie
        is HttpOnly and SameSite=Strict; a command from the page works, a
        request from the same session without its CSRF token is refused;
        a cross-site form post is refused and changes nothing.
        """

        async def go() -> None:
            os.makedirs(self.data)
            with open(os.path.join(self.data, CONTROL_TOKEN_FILE), "w") as f:
                f.write(TOKEN + "\n")
            device, control = await self.start()
            thermostat = self.thermostat(device)
            await self.until("known", lambda: thermostat.subscribes >= 2)

            def scenario(page: Page, browsed: Browsed) -> None:
                login = page.get_by_role("region", name="Log in")
                login.wait_for()
                assert not page.get_by_role("article", name=SERIAL).is_visible()
                login.get_by_label("Control token").fill("wrong")
                login.get_by_role("button", name="Log in").click()
                login.get_by_text("That token is wrong.").wait_for()
                login.get_by_label("Control token").fill(TOKEN)
                login.get_by_role("button", name="Log in").click()
                card = page.get_by_role("article", name=SERIAL)
                card.wait_for()
                (cookie,) = page.context.cookies()
                assert cookie["httpOnly"] is True, cookie
                assert cookie["sameSite"] == "Strict", cookie
                card.get_by_role("button", name="Raise target").click()
                card.get_by_text("Target 20.5 °C").wait_for()
                # The same session without the CSRF header: refused.
                status = page.evaluate(
                    """serial => fetch("command", {method: "POST",
                        headers: {"Content-Type": "application/json"},
                        body: JSON.stringify({serial,
                          command: "set_temperature", value: 25})})
                      .then(response => response.status)""",
                    SERIAL,
                )
                assert status == 403, status
                # A page of another site posts a form to the API.
                page.route(
                    "http://evil.test/**",
                    lambda route: route.fulfill(
                        content_type="text/html",
                        body=f"""<form method="post" action="{control}/command"
                          enctype="text/plain"><input name='{{"serial":"{SERIAL}",
                          "command":"set_temperature","value":30,"x":"' value='"}}'>
                          <button>go</button></form>""",
                    ),
                )
                page.goto("http://evil.test/")
                with page.expect_response(re.compile(r".*/command$")) as answer:
                    page.get_by_role("button", name="go").click()
                assert answer.value.status in (401, 403, 415), answer.value.status
                # Reloading the page logs in again with the cookie.
                page.goto(control + "/")
                page.get_by_role("article", name=SERIAL).get_by_text(
                    "Target 20.5 °C"
                ).wait_for()
                self.screenshots(page, "logged-in")

            await self.browse(control + "/", scenario, ("http://evil.test/",))
            code, status = await self.json(
                "GET",
                f"{control}/status?serial={SERIAL}",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            self.assertEqual(code, 200)
            self.assertEqual(status["target_temperature"], 20.5)

        return Deferred.fromCoroutine(go())

    def test_historyChart(self) -> Deferred[None]:
        """
        A thermostat with recorded history has a chart of the last 24
        hours, with heating bands; its 7 days button (from the keyboard)
        switches to the week; daily usage bars show the heater's hour a
        day. The chart and its buttons are named for assistive technology.
        """

        async def go() -> None:
            device, control = await self.start()
            thermostat = self.thermostat(device)
            await self.until("known", lambda: thermostat.subscribes >= 2)
            await self.pastWeek()

            def scenario(page: Page, browsed: Browsed) -> None:
                card = page.get_by_role("article", name=SERIAL)
                history = card.get_by_role("region", name="History")
                day = history.get_by_role(
                    "img", name=re.compile("Temperature and target, last 24 hours")
                )
                day.wait_for()
                described = day.get_attribute("aria-labelledby") or ""
                assert "desc" in described, described
                summary = day.locator("desc").text_content() or ""
                assert "Heating ran 1 h 0 min" in summary, summary
                assert "°C" in summary, summary
                assert day.locator("rect.band.heating").count() == 1
                period = history.get_by_role("group", name="History period")
                assert (
                    period.get_by_role("button", name="24 hours").get_attribute(
                        "aria-pressed"
                    )
                    == "true"
                )
                period.get_by_role("button", name="7 days").focus()
                page.keyboard.press("Enter")
                week = history.get_by_role(
                    "img", name=re.compile("Temperature and target, last 7 days")
                )
                week.wait_for()
                assert week.locator("rect.band.heating").count() >= 6
                usage = history.get_by_role(
                    "img", name=re.compile("Daily usage, last 7 days")
                )
                usage.wait_for()
                bars = usage.locator("rect.bar.heating")
                assert bars.count() >= 6, bars.count()
                assert "heating 1 h 0 min" in (
                    usage.locator("desc").text_content() or ""
                )
                self.screenshots(page, "history")
                assert browsed.consoleErrors == [], browsed.consoleErrors

            await self.browse(control + "/", scenario)

        return Deferred.fromCoroutine(go())

    def test_accountLogin(self) -> Deferred[None]:
        """
        With a token and an account, the page also logs in by account name
        and password: a wrong password is refused in words; the right one
        gives the same session cookie, whose changing requests still need
        its CSRF token.
        """

        async def go() -> None:
            os.makedirs(self.data)
            with open(os.path.join(self.data, CONTROL_TOKEN_FILE), "w") as f:
                f.write(TOKEN + "\n")
            _device, control = await self.start()
            code, created = await self.json(
                "POST",
                control + "/api/users",
                json={"username": "homeowner", "password": PASSWORD},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            self.assertEqual(code, 200, created)

            def scenario(page: Page, browsed: Browsed) -> None:
                login = page.get_by_role("region", name="Log in")
                form = login.get_by_role("form", name="Log in with an account")
                form.wait_for()
                form.get_by_label("Account name").fill("homeowner")
                form.get_by_label("Password").fill("not the password")
                form.get_by_role("button", name="Log in with account").click()
                form.get_by_text("That account name or password is wrong.").wait_for()
                form.get_by_label("Password").fill(PASSWORD)
                form.get_by_role("button", name="Log in with account").click()
                page.get_by_text("Logged in as homeowner").wait_for()
                page.get_by_text("No thermostat has connected yet").wait_for()
                (cookie,) = page.context.cookies()
                assert cookie["httpOnly"] is True, cookie
                assert cookie["sameSite"] == "Strict", cookie
                status = page.evaluate(
                    """() => fetch("api/register", {method: "POST",
                        headers: {"Content-Type": "application/json"},
                        body: JSON.stringify({code: "123-ABCD", userId: "x"})})
                      .then(response => response.status)"""
                )
                assert status == 403, status
                self.screenshots(page, "account")
                errors = [e for e in browsed.consoleErrors if "403" not in e]
                assert errors == [], errors

            await self.browse(control + "/", scenario)

        return Deferred.fromCoroutine(go())

    def test_underTokenPrefix(self) -> Deferred[None]:
        """Opened under C{/k/<token>/} the page needs no login and works."""

        async def go() -> None:
            os.makedirs(self.data)
            with open(os.path.join(self.data, CONTROL_TOKEN_FILE), "w") as f:
                f.write(TOKEN + "\n")
            device, control = await self.start()
            self.thermostat(device)

            def scenario(page: Page, browsed: Browsed) -> None:
                card = page.get_by_role("article", name=SERIAL)
                card.get_by_role("button", name="Raise target").click()
                card.get_by_text("Target 20.5 °C").wait_for()
                assert page.get_by_role("status").first.inner_text() == "Live"
                assert all(f"/k/{TOKEN}/" in url for url in browsed.requests), (
                    browsed.requests
                )
                assert browsed.consoleErrors == [], browsed.consoleErrors

            await self.browse(f"{control}/k/{TOKEN}/", scenario)

        return Deferred.fromCoroutine(go())


class DashboardHTTPTests(LiveServiceTestCase):
    """The page and its assets as HTTP: types, caching, prefixes."""

    def test_pageAndAssets(self) -> Deferred[None]:
        """
        The page is HTML, never cached, with a policy that forbids loading
        anything from elsewhere; assets have their types and revalidate
        by ETag; an unknown asset is a JSON 404.
        """

        async def go() -> None:
            _device, control = await self.start()
            response = await self.request("GET", control + "/")
            body = await treq.content(response)
            headers = response.headers
            self.assertEqual(response.code, 200)
            self.assertEqual(
                headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"]
            )
            self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])
            (policy,) = headers.getRawHeaders("content-security-policy")
            self.assertIn("default-src 'none'", policy)
            self.assertIn("connect-src 'self'", policy)
            self.assertIn(b'<base href="/">', body)
            self.assertNotIn(b"http", body.replace(b'lang="en"', b""))
            for name, kind in [
                ("app.js", "text/javascript; charset=utf-8"),
                ("schedule.js", "text/javascript; charset=utf-8"),
                ("units.js", "text/javascript; charset=utf-8"),
                ("chart.js", "text/javascript; charset=utf-8"),
                ("dom.js", "text/javascript; charset=utf-8"),
                ("style.css", "text/css; charset=utf-8"),
                ("icon.svg", "image/svg+xml"),
            ]:
                response = await self.request("GET", f"{control}/assets/{name}")
                await treq.content(response)
                self.assertEqual(response.code, 200, name)
                self.assertEqual(response.headers.getRawHeaders("content-type"), [kind])
                self.assertEqual(
                    response.headers.getRawHeaders("cache-control"), ["no-cache"]
                )
                (etag,) = response.headers.getRawHeaders("etag")
                again = await self.request(
                    "GET", f"{control}/assets/{name}", headers={"If-None-Match": etag}
                )
                self.assertEqual((again.code, await treq.content(again)), (304, b""))
            for missing in ["nothing.js", "..%2Fapi.py", "index.html"]:
                code, document = await self.json("GET", f"{control}/assets/{missing}")
                self.assertEqual((code, document["code"]), (404, "not_found"))

        return Deferred.fromCoroutine(go())

    def test_ingressAndPrefix(self) -> Deferred[None]:
        """
        Behind Home Assistant's ingress every link starts with its
        C{X-Ingress-Path}; under C{/k/<token>/} with that prefix; a
        malformed ingress path is ignored.
        """

        async def go() -> None:
            os.makedirs(self.data)
            with open(os.path.join(self.data, CONTROL_TOKEN_FILE), "w") as f:
                f.write(TOKEN + "\n")
            _device, control = await self.start()
            for path, ingress, base in [
                (
                    "/",
                    "/api/hassio_ingress/abc-DEF_1",
                    "/api/hassio_ingress/abc-DEF_1/",
                ),
                (f"/k/{TOKEN}/", None, f"/k/{TOKEN}/"),
                ("/", '/x"><script>', "/"),
            ]:
                headers: dict[bytes | str, bytes | str] = (
                    {} if ingress is None else {"X-Ingress-Path": ingress}
                )
                response = await self.request("GET", control + path, headers=headers)
                body = await treq.content(response)
                self.assertEqual(response.code, 200)
                self.assertIn(f'<base href="{base}">'.encode(), body)

        return Deferred.fromCoroutine(go())

    def test_accountLoginThrottled(self) -> Deferred[None]:
        """
        With a token, C{/api/session} says accounts may log in once one
        exists; an account login gives a session naming its account; wrong
        passwords count against the address like wrong tokens, and once
        locked out even the right password waits.
        """

        async def go() -> None:
            os.makedirs(self.data)
            with open(os.path.join(self.data, CONTROL_TOKEN_FILE), "w") as f:
                f.write(TOKEN + "\n")
            _device, control = await self.start()
            code, session = await self.json("GET", control + "/api/session")
            self.assertEqual((code, session["accounts"]), (200, False))
            code, _ = await self.json(
                "POST",
                control + "/api/users",
                json={"username": "homeowner", "password": PASSWORD},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            self.assertEqual(code, 200)
            code, session = await self.json("GET", control + "/api/session")
            self.assertEqual(
                (session["accounts"], session["authenticated"], session["user"]),
                (True, False, None),
            )
            response = await self.request(
                "POST",
                control + "/api/login",
                json={"username": "homeowner", "password": PASSWORD},
            )
            await treq.content(response)
            self.assertEqual(response.code, 200)
            (cookie,) = response.headers.getRawHeaders("set-cookie")
            self.assertIn("HttpOnly", cookie)
            self.assertIn("samesite=strict", cookie.lower())
            code, session = await self.json(
                "GET",
                control + "/api/session",
                headers={"Cookie": cookie.split(";", 1)[0]},
            )
            self.assertEqual(
                (session["authenticated"], session["user"]), (True, "homeowner")
            )
            for attempt in [
                {"username": "homeowner", "password": "wrong password"},
                {"username": "nobody", "password": PASSWORD},
                {"username": "homeowner", "password": 12345678},
                {"token": "wrong"},
                {"username": "homeowner", "password": "wrong again"},
            ]:
                code, refused = await self.json(
                    "POST", control + "/api/login", json=attempt
                )
                self.assertEqual(code, 403, attempt)
                self.assertIn(refused["code"], ("wrong_password", "wrong_token"))
            code, refused = await self.json(
                "POST",
                control + "/api/login",
                json={"username": "homeowner", "password": PASSWORD},
            )
            self.assertEqual(code, 429, refused)

        return Deferred.fromCoroutine(go())
