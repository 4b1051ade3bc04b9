"""The reviewer web page, in a real browser: `warden run --review-listen`
serves it over HTTPS with a certificate from the agent's CA; a reviewer signs
in with OIDC (authorization code + PKCE, oidc-provider-mock), sees what
waits, and approves or rejects it, with the keyboard only. Signed out, the
page shows nothing of what waits and its forms change nothing; a reviewer
outside the rule's groups is refused on the page as on the command line.

Headless Chromium and chromedriver are Debian's (`cargo xtask setup`
installs them); selenium drives them and never downloads a browser."""
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from oidc import OidcProvider  # noqa: E402
from pg import PostgresServer  # noqa: E402

from conftest import WARDEN, read_requests  # noqa: E402
from test_approvals import HeldRun, approval_rows, pg, program  # noqa: E402,F401 (pg: the fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Subjects differ from emails, so that the audit's reviewer (the subject)
# and the page's "signed in as" (the email) are told apart.
REVIEWER, REVIEWER_EMAIL = "dana", "dana@example.com"  # in the dba group
OUTSIDER, OUTSIDER_EMAIL = "sam", "sam@example.com"  # not in the dba group
OWNER = "olga@example.com"
SECRET_ENV = "WARDEN_TEST_OIDC_SECRET"
RULE = "writes-need-a-dba"
STATEMENT = "INSERT INTO customers (name) VALUES "
WAIT = 20  # seconds for the browser to get somewhere


@pytest.fixture(scope="module")
def idp():
    with OidcProvider() as provider:
        provider.set_user(REVIEWER, groups=["dba"], email=REVIEWER_EMAIL)
        provider.set_user(OUTSIDER, groups=["support"], email=OUTSIDER_EMAIL)
        yield provider


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory) -> Path:
    """The agent's CA (default state dir), as `warden ca export` prints it."""
    exported = subprocess.run([WARDEN, "ca", "export"], capture_output=True, text=True, timeout=30)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith("-----BEGIN CERTIFICATE-----"), exported.stdout[:200]
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_text(exported.stdout)
    return path


def trusting(ca_pem: Path) -> ssl.SSLContext:
    """A TLS context that trusts the agent's CA and nothing else, and checks
    that the certificate names 127.0.0.1."""
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


@pytest.fixture
def browser():
    """Headless Debian Chromium through Debian's chromedriver; a fresh
    profile (no cookies) per test. Missing, the test fails: it is part of
    the suite, not optional."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run `cargo xtask setup` "
                    "(it installs the Debian packages chromium and chromium-driver)", pytrace=False)
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail(f"selenium is not installed for {sys.executable}: run `cargo xtask setup` "
                    "(pip install -r tests/requirements.txt)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The page's certificate is checked with the agent's CA below (httpx);
    # Chromium would need it in an NSS database to trust it.
    # Loopback only: no background fetches (updates, safe browsing, field
    # trials), and no host name resolves: nothing but 127.0.0.1 is reached.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--ignore-certificate-errors",
                "--window-size=1280,1000", "--no-proxy-server", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-domain-reliability",
                "--no-first-run", "--no-default-browser-check", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    # An explicit driver path: selenium-manager never runs, nothing is downloaded.
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def policy(tmp_path: Path, pg: PostgresServer, idp: OidcProvider) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        workloads:
          bot:
            match: {{ exe: "{os.path.realpath(sys.executable)}" }}
            owners: ["{OWNER}"]
        targets:
          crm: {{ address: 127.0.0.1, port: {pg.port}, protocol: postgres }}
        rules:
          - name: {RULE}
            when: {{ target: crm, sql: {{ class: [write, ddl] }} }}
            action: approve
            approve: {{ groups: [dba], expires: 10m }}
        approvals:
          oidc: {{ issuer: "{idp.issuer}", client_id: warden, client_secret_env: {SECRET_ENV} }}
        """))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReviewRun(HeldRun):
    """`warden run --review-listen` in the background: the held program,
    the control socket and the reviewer page at `self.base`."""

    def __init__(self, tmp_path: Path, audit_dir: Path, policy_path: Path, code: str, ca_pem: Path):
        self.socket = tmp_path / "control.sock"
        self.port = _free_port()
        self.base = f"https://127.0.0.1:{self.port}"
        self.ctx = trusting(ca_pem)
        env = dict(os.environ)
        env[SECRET_ENV] = "any-non-empty-secret"
        cmd = [WARDEN, "run", "--audit-dir", str(audit_dir), "--policy", str(policy_path),
               "--control-socket", str(self.socket), "--review-listen", f"127.0.0.1:{self.port}",
               "--", sys.executable, "-c", code]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def http(self, **kw) -> httpx.Client:
        """A client that trusts the agent's CA only; no proxy, no redirects followed."""
        return httpx.Client(base_url=self.base, verify=self.ctx, trust_env=False, timeout=10,
                            follow_redirects=False, **kw)

    def wait_page(self, timeout: float = 30) -> httpx.Response:
        """Waits until the page answers over verified TLS; returns `GET /`."""
        deadline = time.monotonic() + timeout
        last = None
        with self.http() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"warden run ended early:\n{self.proc.stdout.read()}\n{self.proc.stderr.read()}")
                try:
                    return client.get("/")
                except httpx.TransportError as e:
                    last = e
                time.sleep(0.1)
        raise AssertionError(f"the reviewer page did not answer on {self.base} within {timeout}s: {last!r}")


@pytest.fixture
def review(tmp_path, audit_dir, ca_pem):
    runs = []

    def start(policy_path: Path, code: str) -> ReviewRun:
        run = ReviewRun(tmp_path, audit_dir, policy_path, code, ca_pem)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


# --- the browser, by keyboard -------------------------------------------------

def wait_until(driver, what: str, condition, timeout: float = WAIT):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(condition)
    except TimeoutException:
        raise AssertionError(f"{what}: not within {timeout}s; at {driver.current_url}:\n{driver.page_source[:3000]}")


def by_id(driver, id_: str):
    from selenium.webdriver.common.by import By

    return wait_until(driver, f"#{id_} on the page",
                      lambda d: (d.find_elements(By.ID, id_) or [None])[0])


def tab_to(driver, element, what: str, max_tabs: int = 40):
    """Moves the keyboard focus with TAB until it is on `element`, as
    someone without a mouse would."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(max_tabs):
        if driver.switch_to.active_element == element:
            return
        ActionChains(driver).send_keys(Keys.TAB).perform()
    raise AssertionError(f"{what} never got the keyboard focus in {max_tabs} TABs "
                         f"(focus is on {driver.switch_to.active_element.get_attribute('outerHTML')[:200]})")


def press(driver, element, what: str):
    """TAB to `element`, then Enter."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    tab_to(driver, element, what)
    ActionChains(driver).send_keys(Keys.ENTER).perform()


def type_text(driver, text: str, *then):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(text, *then).perform()


def at_home(run: ReviewRun):
    return lambda d: d.current_url.rstrip("/") == run.base


def shows_nothing_pending(page: str, pending: dict):
    """Nothing of the request in `page`: not its statement, id, rule or requester."""
    for secret in (STATEMENT, "INSERT INTO customers", pending["id"], RULE, pending["requester"]["exe"]):
        assert secret not in page, f"signed out, the page shows {secret!r}:\n{page[:3000]}"


def sign_in(driver, run: ReviewRun, idp: OidcProvider, sub: str, email: str):
    """From the signed-out page: the sign-in link by keyboard, the
    provider's form (sub typed, Enter), back home signed in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(run.base + "/")
    link = by_id(driver, "sign-in")
    assert link.tag_name == "a" and link.get_attribute("href") == run.base + "/login"
    press(driver, link, "the sign-in link")
    wait_until(driver, "the provider's authorization form",
               lambda d: d.current_url.startswith(idp.issuer) and d.find_elements(By.CSS_SELECTOR, "input[placeholder=sub]"))
    # The code flow with PKCE: the page sent a code challenge.
    assert "code_challenge=" in driver.current_url and "code_challenge_method=S256" in driver.current_url, driver.current_url
    params = httpx.URL(driver.current_url).params
    assert params.get("redirect_uri") == run.base + "/callback", driver.current_url
    assert params.get("client_id") == "warden", driver.current_url
    field = driver.find_element(By.CSS_SELECTOR, "input[placeholder=sub]")
    tab_to(driver, field, "the provider's sub field")
    type_text(driver, sub, Keys.ENTER)
    wait_until(driver, f"back home signed in as {sub}",
               lambda d: at_home(run)(d) and d.find_elements(By.ID, "who"))
    assert email in by_id(driver, "who").text


def pending_links(driver) -> dict[str, object]:
    """The `#pending` table's links, by approval id."""
    from selenium.webdriver.common.by import By

    links = driver.find_elements(By.CSS_SELECTOR, "table#pending tr a.request")
    return {a.get_attribute("href").rsplit("/approvals/", 1)[-1]: a for a in links}


def open_request(driver, run: ReviewRun, pending: dict):
    """From home, the request's link by keyboard; checks what it shows."""
    links = pending_links(driver)
    assert pending["id"] in links, f"{pending['id']} not listed: {list(links)}\n{driver.page_source[:3000]}"
    link = links[pending["id"]]
    assert link.get_attribute("href") == f"{run.base}/approvals/{pending['id']}"
    press(driver, link, "the request's link")
    wait_until(driver, "the request's page", lambda d: d.current_url == f"{run.base}/approvals/{pending['id']}")
    statement = by_id(driver, "request")
    assert statement.tag_name == "pre"
    assert statement.text.startswith(STATEMENT) and statement.text == pending["request"], statement.text
    context = by_id(driver, "context")
    assert context.tag_name == "dl"
    # Who asked, as the kernel told the agent (the exe, not the argv the
    # process may have rewritten), where to, and under which rule.
    requester = pending["requester"]
    expected = {"workload": "bot", "exe": requester["exe"], "pid": str(requester["pid"]), "user": requester["user"],
                "destination": pending["destination"], "rule": RULE}
    missing = {k: v for k, v in expected.items() if not v or v not in context.text}
    assert not missing, f"#context lacks {missing}; it says:\n{context.text}"
    # Never the command line: the program's carries its database password.
    assert "app-secret" not in driver.page_source


def assert_forms_carry_a_token(driver, *buttons: str):
    """The forms of these buttons post, with a hidden (CSRF) field that has a value."""
    from selenium.webdriver.common.by import By

    for button in buttons:
        form = by_id(driver, button).find_element(By.XPATH, "ancestor::form")
        assert (form.get_attribute("method") or "").lower() == "post", form.get_attribute("outerHTML")
        hidden = form.find_elements(By.CSS_SELECTOR, "input[type=hidden]")
        assert any(h.get_attribute("value") for h in hidden), form.get_attribute("outerHTML")


# --- the tests ----------------------------------------------------------------

def test_a_reviewer_signs_in_and_approves_with_the_keyboard(browser, pg, idp, ca_pem, tmp_path, audit_dir, review):
    from selenium.webdriver.common.by import By

    run = review(policy(tmp_path, pg, idp), program(pg, "approved-on-the-page"))
    [pending] = run.pending()
    id_ = pending["id"]

    # The TLS is the agent's: the certificate verifies against `warden ca
    # export` and names 127.0.0.1; a client that trusts only the public CAs
    # refuses it.
    home = run.wait_page()
    assert home.status_code == 200 and 'id="sign-in"' in home.text, home.text[:2000]
    shows_nothing_pending(home.text, pending)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(run.base + "/", trust_env=False, timeout=10)

    # Signed out, forms change nothing (no session, no CSRF token).
    with run.http() as client:
        for verb, form in (("approve", {}), ("reject", {"reason": "signed out"}),
                           ("approve", {"csrf": "guessed"})):
            answer = client.post(f"/approvals/{id_}/{verb}", data=form)
            refused = answer.status_code in (401, 403) or (
                answer.status_code == 303 and answer.headers.get("location") in ("/", run.base + "/"))
            assert refused, (verb, form, answer.status_code, answer.headers, answer.text[:500])
            shows_nothing_pending(answer.text, pending)
        # Nor does a GET of the request's page show it.
        answer = client.get(f"/approvals/{id_}")
        assert answer.status_code in (200, 302, 303, 401, 403), answer.status_code
        shows_nothing_pending(answer.text, pending)
    assert [p["id"] for p in run.pending()] == [id_] and run.pending()[0]["approved_by"] == []

    # The browser, signed out: nothing pending shows, on / or on the request's page.
    browser.get(run.base + "/")
    by_id(browser, "sign-in")
    shows_nothing_pending(browser.page_source, pending)
    browser.get(f"{run.base}/approvals/{id_}")
    wait_until(browser, "signed out, the request's page sends home or asks to sign in",
               lambda d: at_home(run)(d) or d.find_elements(By.ID, "sign-in"))
    shows_nothing_pending(browser.page_source, pending)

    sign_in(browser, run, idp, REVIEWER, REVIEWER_EMAIL)
    assert list(pending_links(browser)) == [id_]
    assert browser.find_element(By.ID, "sign-out").tag_name == "button"
    assert_forms_carry_a_token(browser, "sign-out")

    # Signed in, a form posted without the page's CSRF token is refused.
    session = {c["name"]: c["value"] for c in browser.get_cookies()}
    assert session, "signed in, but the browser holds no cookie"
    with run.http(cookies=session) as client:
        forged = client.post(f"/approvals/{id_}/approve", data={"csrf": "not-the-token"})
        assert forged.status_code in (400, 401, 403), (forged.status_code, forged.headers, forged.text[:500])
    assert run.pending()[0]["approved_by"] == []

    open_request(browser, run, pending)
    assert_forms_carry_a_token(browser, "approve", "reject")
    press(browser, by_id(browser, "approve"), "the approve button")
    wait_until(browser, "home with a message", lambda d: at_home(run)(d) and d.find_elements(By.ID, "flash"))
    flash = by_id(browser, "flash")
    assert flash.get_attribute("role") == "status" and "approved" in flash.text.lower(), flash.text
    assert not browser.find_elements(By.ID, "error")
    assert id_ not in pending_links(browser)

    report = run.finish()
    assert report["write"] == "ok" and report["after"] == 1, report
    steps = approval_rows(audit_dir)
    assert [(r["step"], r["reviewer"]) for r in steps] == [
        ("requested", None), ("approved", REVIEWER), ("executed", None)], steps
    assert {r["approval_id"] for r in steps} == {id_}
    assert steps[1]["reviewer_email"] == REVIEWER_EMAIL and list(steps[1]["reviewer_groups"]) == ["dba"]
    [insert] = read_requests(audit_dir, "statement LIKE 'INSERT%'")
    assert insert["decision"] == "allow" and insert["approval_id"] == id_


def test_an_outsider_is_refused_and_a_reviewer_rejects_with_a_reason(browser, pg, idp, ca_pem, tmp_path, audit_dir,
                                                                     review):
    from selenium.webdriver.common.by import By

    run = review(policy(tmp_path, pg, idp), program(pg, "rejected-on-the-page"))
    [pending] = run.pending()
    id_ = pending["id"]
    run.wait_page()

    # Someone outside the rule's groups: the page refuses, the request waits.
    sign_in(browser, run, idp, OUTSIDER, OUTSIDER_EMAIL)
    open_request(browser, run, pending)
    press(browser, by_id(browser, "approve"), "the approve button")
    wait_until(browser, "home with an error", lambda d: at_home(run)(d) and d.find_elements(By.ID, "error"))
    error = by_id(browser, "error")
    assert error.get_attribute("role") == "alert", error.get_attribute("outerHTML")
    assert "not in a group" in error.text and "dba" in error.text, error.text
    assert not browser.find_elements(By.ID, "flash")
    assert [p["id"] for p in run.pending()] == [id_] and run.pending()[0]["approved_by"] == []
    assert id_ in pending_links(browser)

    # Signing out (by keyboard) leaves nothing to see.
    press(browser, by_id(browser, "sign-out"), "the sign-out button")
    wait_until(browser, "signed out", lambda d: d.find_elements(By.ID, "sign-in"))
    shows_nothing_pending(browser.page_source, pending)

    # A DBA rejects, with a reason typed in.
    sign_in(browser, run, idp, REVIEWER, REVIEWER_EMAIL)
    open_request(browser, run, pending)
    reason = by_id(browser, "reason")
    assert reason.get_attribute("name") == "reason"
    tab_to(browser, reason, "the reason field")
    type_text(browser, "not during the freeze")
    press(browser, by_id(browser, "reject"), "the reject button")
    wait_until(browser, "home with a message", lambda d: at_home(run)(d) and d.find_elements(By.ID, "flash"))
    flash = by_id(browser, "flash")
    assert flash.get_attribute("role") == "status" and "rejected" in flash.text.lower(), flash.text
    assert id_ not in pending_links(browser)

    report = run.finish()
    assert report["write"] == "error" and report["sqlstate"] == "42501", report
    assert "not during the freeze" in report["message"], report["message"]
    assert report["after"] == 0
    steps = approval_rows(audit_dir)
    assert [(r["step"], r["reviewer"]) for r in steps] == [
        ("requested", None), ("refused", OUTSIDER), ("rejected", REVIEWER)], steps
    assert steps[2]["reason"] == "not during the freeze"
    [insert] = read_requests(audit_dir, "statement LIKE 'INSERT%'")
    assert insert["decision"] == "deny" and insert["approval_id"] == id_
