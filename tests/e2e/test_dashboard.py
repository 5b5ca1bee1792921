"""The dashboard in a real browser: headless Chromium driven by Selenium (chromedriver),
against two real hosts on this machine. Health colours (green, then red with the reason
when the replica is down), a test failover started and stopped from the replica's VM
page (confirmation dialogs accepted), CSRF and session checks, single-use login links.
A screenshot of the running test failover goes to build/screenshots/."""

from __future__ import annotations

import shutil
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness import lab

pytestmark = pytest.mark.e2e

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

VM = "dash"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--ignore-certificate-errors", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,1000")


def _wait(what, fn, timeout=30.0, every=0.2):
    """Poll ``fn`` until it returns something true (stale elements count as not yet)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except (StaleElementReferenceException, NoSuchElementException) as err:
            last = err
        assert time.monotonic() < deadline, f"timed out waiting for {what} (last: {last!r})"
        time.sleep(every)


def _login_url(host: lab.LabHost) -> str:
    return host.json("dashboard")["url"]


def _base(url: str) -> str:
    return url.split("/login", 1)[0]


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE      # the host's own self-signed certificate
    return ctx


def _http(method: str, url: str, data: bytes | None = None) -> tuple[int, str]:
    """A request without any cookie (no session)."""
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, context=_insecure(), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _row(driver, vm=VM):
    return driver.find_element(By.CSS_SELECTOR, f'#replicated tr[data-vm="{vm}"]')


def _row_health(driver, vm=VM) -> tuple[str, str, str, str]:
    """(data-health, row class, pill background colour, row text) of a VM's row."""
    row = _row(driver, vm)
    pill = row.find_element(By.CSS_SELECTOR, ".pill.health")
    return (row.get_attribute("data-health"), row.get_attribute("class"),
            pill.value_of_css_property("background-color"), row.text)


def _row_health_if(driver, level: str):
    found = _row_health(driver)
    return found if found[0] == level else None


def _rgb(css: str) -> tuple[int, int, int]:
    inner = css[css.index("(") + 1:css.index(")")]
    r, g, b = (int(float(x)) for x in inner.split(",")[:3])
    return r, g, b


def _is_green(css):
    r, g, b = _rgb(css)
    return g > 100 and g > r + 50 and g > b + 30


def _is_red(css):
    r, g, b = _rgb(css)
    return r > 180 and g < 90 and b < 90


def _vms(host) -> dict[str, str]:
    return {v["name"]: v["state"] for v in host.json("vm", "list")}


def _act(driver, action: str, timeout=60.0) -> str:
    """Click an action's button on a VM page, accept the confirmation, wait for the
    result the page shows after the action ran; returns the result's text."""
    def click():
        form = driver.find_element(By.CSS_SELECTOR, f'form[data-action="{action}"]')
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        return True
    _wait(f"the {action} button", click, timeout=15)
    alert = _wait("the confirmation dialog", lambda: _alert(driver), timeout=10)
    assert action != "test" or "test failover" in alert.text.lower()
    alert.accept()
    result = _wait(f"the result of {action}",
                   lambda: driver.find_element(By.ID, "result"), timeout=timeout)
    return result.get_attribute("data-kind") + ": " + result.text


def _alert(driver):
    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return None


def _post_from_page(driver, path: str, fields: dict) -> dict:
    """A form POST made by the page's own JS (same origin, with the session cookie)."""
    return driver.execute_async_script("""
        const [path, fields, done] = arguments;
        fetch(path, {method: 'POST', body: new URLSearchParams(fields), redirect: 'manual',
                     credentials: 'same-origin'})
          .then(r => r.text().then(t => done({status: r.status, text: t})))
          .catch(e => done({status: -1, text: String(e)}));
    """, path, fields)


@pytest.fixture
def hosts(fresh_dir):
    a = b = None
    try:
        a, b = lab.two_sites(fresh_dir)
        yield a, b
    finally:
        lab.teardown(*[h for h in (a, b) if h is not None])


@pytest.fixture
def browser(tmp_path, request):
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists():
            pytest.skip(f"{exe} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    failed_before = request.session.testsfailed
    try:
        driver.set_script_timeout(30)
        yield driver
        if request.session.testsfailed > failed_before:   # what the browser showed last
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(SCREENSHOTS / "dashboard-failure.png"))
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


def test_dashboard_in_a_browser(hosts, browser):
    a, b = hosts
    driver = browser
    t0 = time.monotonic()
    a.run("vm", "create", VM, "--disk", "64M", "--disk", "32M", "--guest", "demo")
    a.run("vm", "start", VM)
    a.run("vm", "create", "plain", "--disk", "16M")
    a.run("enable", VM, "--replica", b.address, "--point-interval", "2s")
    a.run("initial", VM)
    for _ in range(2):
        time.sleep(2.1)              # one recovery point per interval
        a.run("sync", VM)

    # -- the primary's dashboard: a green row, then red with the reason -------------------
    url = _login_url(a)
    base_a = _base(url)
    driver.get(url)
    assert driver.current_url == base_a + "/"
    assert driver.find_element(By.ID, "host-name").text == "site-a"
    health, cls, colour, text = _row_health(driver)
    assert health == "normal" and "health-normal" in cls and _is_green(colour), (cls, colour)
    for word in ("primary", "site-b", "replicating", "periodic", "5m"):
        assert word in text
    plain = driver.find_element(By.CSS_SELECTOR, '#unreplicated tr[data-vm="plain"]')
    assert "stopped" in plain.text

    # The primary's VM page: figures, a bar per cycle, the replica's points, and an action.
    driver.get(f"{base_a}/vm/{VM}")
    assert "site-b" in driver.find_element(By.ID, "status").text
    bars = driver.find_elements(By.CSS_SELECTOR, "#chart svg rect.bar")
    assert len(bars) == 3                                  # initial + 2 syncs
    assert driver.find_elements(By.CSS_SELECTOR, '#points tr[data-point="latest"]')
    assert {f.get_attribute("data-action") for f in driver.find_elements(
        By.CSS_SELECTOR, "form[data-action]")} == {"sync", "suspend", "prepare"}
    result = _act(driver, "sync")
    assert result.startswith("ok:") and "acknowledged by site-b" in result, result
    _wait("4 bars", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#chart rect.bar")) == 4,
          timeout=5)

    b.stop()                                               # the replica goes away
    for _ in range(2):
        proc = a.run("sync", VM, check=False)
        assert proc.returncode == 1 and "cannot reach site-b" in proc.stderr, proc.stderr
    driver.get(base_a + "/")
    health, cls, colour, text = _wait("the row to turn critical",
                                      lambda: _row_health_if(driver, "critical"))
    assert "health-critical" in cls and _is_red(colour), (cls, colour)
    assert "cannot reach site-b" in text, text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / "dashboard-critical.png"))
    b.start()
    a.run("sync", VM)
    # The page refreshes itself (every 5 s): the row goes back to green without a reload.
    _wait("the row to turn normal again", lambda: _row_health(driver)[0] == "normal", timeout=15)
    assert _is_green(_row_health(driver)[2])

    # -- no session, used login links -------------------------------------------------------
    url = _login_url(b)
    base_b = _base(url)
    status, body = _http("GET", base_b + "/")
    assert status == 401 and "vmreplica dashboard" in body
    status, body = _http("POST", f"{base_b}/vm/{VM}/action", b"action=test&confirmed=1")
    assert status == 401
    status, _ = _http("GET", f"{base_b}/live/index")
    assert status == 401

    # -- the replica's dashboard (a session of its own daemon) -------------------------------
    driver.get(url)
    assert driver.current_url == base_b + "/"
    assert driver.find_element(By.ID, "host-name").text == "site-b"
    health, cls, colour, text = _row_health(driver)
    expected = b.json("status", VM)[0]["health"]
    assert health == expected and f"health-{expected}" in cls and "replica" in text
    driver.get(url)                                        # the same link a second time
    assert "not valid" in driver.find_element(By.TAG_NAME, "body").text
    driver.get(base_b + "/")                               # the session itself still works
    assert _row(driver)

    driver.get(f"{base_b}/vm/{VM}")
    actions = {f.get_attribute("data-action") for f in driver.find_elements(
        By.CSS_SELECTOR, "form[data-action]")}
    assert actions == {"test", "failover", "force-failover"}, actions
    point = driver.find_element(By.CSS_SELECTOR, 'form[data-action="test"] select[name=point]')
    assert point.get_attribute("value") == "latest"
    csrf = driver.find_element(By.CSS_SELECTOR, 'form[data-action="test"] input[name=csrf]')
    csrf = csrf.get_attribute("value")

    # Refused without the CSRF token, or with a wrong one; unconfirmed: a confirmation page.
    path = f"/vm/{VM}/action"
    r = _post_from_page(driver, path, {"action": "test", "confirmed": "1", "point": "latest"})
    assert r["status"] == 403 and "CSRF" in r["text"], r
    r = _post_from_page(driver, path, {"action": "test", "confirmed": "1", "csrf": "x" + csrf})
    assert r["status"] == 403, r
    r = _post_from_page(driver, path, {"action": "test", "csrf": csrf})
    assert r["status"] == 200 and 'id="confirm"' in r["text"], r
    assert f"{VM}-test" not in _vms(b)                     # none of them did anything

    # Test failover from the browser.
    result = _act(driver, "test")
    assert result.startswith("ok:") and f"{VM}-test runs from point" in result, result
    assert _vms(b).get(f"{VM}-test") == "running"
    assert driver.find_element(By.CSS_SELECTOR, 'form[data-action="stop-test"]')
    assert f"{VM}-test" in driver.find_element(By.ID, "status").text
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(900, height + 40), 2400))
    shot = SCREENSHOTS / "dashboard-test-failover.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # The index lists the test VM among the VMs without replication.
    driver.get(base_b + "/")
    note = driver.find_element(By.CSS_SELECTOR, f'#unreplicated tr[data-vm="{VM}-test"]').text
    assert "running" in note and f"test failover of {VM}" in note

    driver.get(f"{base_b}/vm/{VM}")
    result = _act(driver, "stop-test")
    assert result.startswith("ok:") and f"{VM}-test and its files deleted" in result, result
    assert f"{VM}-test" not in _vms(b)
    assert b.json("status", VM)[0]["test_vm"] is None

    # An action the state does not allow any more is refused by the server.
    r = _post_from_page(driver, path, {"action": "stop-test", "confirmed": "1", "csrf": csrf})
    assert r["status"] == 409 and "not available" in r["text"], r
    print(f"dashboard test took {time.monotonic() - t0:.1f} s")
