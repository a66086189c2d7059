"""The playground in a real browser: headless Chromium driven by Playwright (sync API).

Each test opens the page of a real ``tenantflow serve --playground`` process (with an
admin token, so the page is reached through the ``?token=`` login), checks what a user
sees, saves screenshots under its ``tmp_path`` and fails on any console error or
uncaught page error. Waits are bounded and generous; nothing asserts a wall-clock time.
Skipped without Chromium or Playwright (see ``conftest.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import ServeFactory, ServeProcess
    from playwright.sync_api import Browser, ConsoleMessage, Error, Page

WAIT_MS = 30_000  # a bound on every wait, never an expectation
LAPTOP = {"width": 1366, "height": 800}
NARROW = {"width": 390, "height": 844}

APPROVAL_FLOW = """\
from tenantflow import WorkflowEntrypoint, log


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        order = step.do("reserve", lambda: {"sku": event.payload["sku"]})
        step.sleep("settle", "1 second")
        approval = step.wait_for_event("approval", type="approval", timeout="1 hour")
        log.info("approved by " + approval["payload"]["by"])
        return step.do("ship", lambda: {"shipped": order["sku"], "by": approval["payload"]["by"]})
"""

SYNTAX_ERROR = """\
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint)
    def run(self, event, step):
        return step.do("never", lambda: 1)
"""

FAILING = """\
from tenantflow import WorkflowEntrypoint, NonRetryableError


def refuse():
    raise NonRetryableError("card declined")


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("prepare", lambda: "ready")
        return step.do("charge", refuse)
"""

FLAKY = """\
from tenantflow import WorkflowEntrypoint


def flaky(ctx):
    if ctx.attempt < 3:
        raise ValueError("not yet, attempt " + str(ctx.attempt))
    return {"attempt": ctx.attempt}


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        retries = {"limit": 3, "delay": "1 second", "backoff": "constant"}
        return step.do("flaky", flaky, retries=retries)
"""

SLEEPY = """\
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        first = step.do("first", lambda: "one")
        step.sleep("nap", "3 seconds")
        approval = step.wait_for_event("approval", type="approval", timeout="1 hour")
        return step.do("last", lambda: {"first": first, "by": approval["payload"]["by"]})
"""

#: Records every (step name, status) the checklist shows, in the order it shows them.
RECORD_STEPS = """() => {
    window.seenSteps = [];
    const list = document.getElementById("steps");
    const record = () => {
        for (const item of list.querySelectorAll("li")) {
            const entry = item.dataset.name + ":" + item.dataset.status;
            if (!window.seenSteps.includes(entry)) window.seenSteps.push(entry);
        }
    };
    new MutationObserver(record).observe(list, {childList: true, subtree: true});
}"""


@dataclass
class Ui:
    """A logged-in page of the playground, with what its console said."""

    page: Page
    shots: Path
    problems: list[str] = field(default_factory=list)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 0
        return path

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text}")

    def on_page_error(self, error: Error) -> None:
        self.problems.append(f"pageerror: {error}")

    def assert_clean(self, allowed: tuple[re.Pattern[str], ...] = ()) -> None:
        unexpected = [p for p in self.problems if not any(a.search(p) for a in allowed)]
        assert unexpected == [], unexpected

    def run(self, source: str, params: str) -> None:
        self.page.locator("#source").fill(source)
        self.page.locator("#params").fill(params)
        self.page.locator("#run").click()

    def steps(self) -> list[tuple[str, str]]:
        items = self.page.locator("#steps li")
        return [
            (
                str(items.nth(i).get_attribute("data-name")),
                str(items.nth(i).get_attribute("data-status")),
            )
            for i in range(items.count())
        ]


def open_ui(browser: Browser, server: ServeProcess, shots: Path, viewport: Any = None) -> Ui:
    from playwright.sync_api import expect

    context = browser.new_context(viewport=viewport or LAPTOP)
    page = context.new_page()
    ui = Ui(page, shots)
    page.on("console", ui.on_console)
    page.on("pageerror", ui.on_page_error)
    response = page.goto(f"{server.url}/playground?token={server.token}")
    assert response is not None and response.status == 200
    assert page.url == f"{server.url}/playground"  # the token is gone from the address bar
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
    return ui


@pytest.fixture
def ui(browser: Browser, shared_server: ServeProcess, tmp_path: Path) -> Iterator[Ui]:
    ui = open_ui(browser, shared_server, tmp_path)
    try:
        yield ui
    finally:
        ui.page.context.close()


def expect_step(ui: Ui, index: int, name: str, status: str) -> None:
    from playwright.sync_api import expect

    item = ui.page.locator("#steps li").nth(index)
    expect(item).to_have_attribute("data-name", name, timeout=WAIT_MS)
    expect(item).to_have_attribute("data-status", status, timeout=WAIT_MS)


# ---------------------------------------------------------------------- write and run


def test_run_a_workflow_and_approve_it_from_the_page(ui: Ui) -> None:
    from playwright.sync_api import expect

    page = ui.page
    expect(page.locator("#source")).to_have_value(re.compile("TenantWorkflow"))  # the example
    ui.shot("example")
    page.evaluate(RECORD_STEPS)
    ui.run(APPROVAL_FLOW, '{"sku": "B-42"}')
    expect(page.locator("#view-tenant")).to_have_text("playground", timeout=WAIT_MS)
    expect_step(ui, 0, "reserve", "complete")
    expect_step(ui, 1, "settle", "complete")
    expect_step(ui, 2, "approval", "waiting")
    expect_step(ui, 3, "ship", "pending")  # not called yet: guessed from the source
    expect(page.locator("#view-status")).to_have_text("waiting")
    expect(page.locator("#view-conn")).to_have_attribute("data-state", "live")
    expect(page.locator("#steps li").nth(0)).to_contain_text('"sku": "B-42"')
    ui.shot("waiting-for-approval")

    page.locator("#event-type").fill("approval")
    page.locator("#event-payload").fill('{"by": "dana"}')
    page.locator("#send-event").click()
    expect(page.locator("#view-status")).to_have_text("complete", timeout=WAIT_MS)
    expect_step(ui, 3, "ship", "complete")
    assert ui.steps() == [
        ("reserve", "complete"),
        ("settle", "complete"),
        ("approval", "complete"),
        ("ship", "complete"),
    ]
    output = page.locator("#result-output")
    expect(output).to_contain_text('"shipped": "B-42"')
    expect(output).to_contain_text('"by": "dana"')
    expect(page.locator("#logs")).to_contain_text("approved by dana")
    expect(page.locator("#view-conn")).to_have_attribute("data-state", "finished")
    # The steps lit up in call order: each one completed before the next one started.
    seen: list[str] = page.evaluate("window.seenSteps")
    completed = [entry.split(":")[0] for entry in seen if entry.endswith(":complete")]
    assert completed == ["reserve", "settle", "approval", "ship"], seen
    assert seen.index("approval:waiting") < seen.index("approval:complete"), seen
    ui.shot("complete")
    ui.assert_clean()


def test_a_compile_error_shows_its_line_in_the_editor(ui: Ui) -> None:
    from playwright.sync_api import expect

    page = ui.page
    ui.run(SYNTAX_ERROR, "{}")
    box = page.locator("#compile-error")
    expect(box).to_be_visible(timeout=WAIT_MS)
    expect(box).to_contain_text("main.py, line 4")
    expect(box).to_contain_text("SyntaxError")
    expect(page.locator('#gutter [data-line="4"]')).to_have_class(re.compile(r"\berror\b"))
    expect(page.locator("#error-band")).to_be_visible()
    # The editor jumped to the line: the cursor is at its start, the line selected.
    start, end = page.locator("#source").evaluate("(el) => [el.selectionStart, el.selectionEnd]")
    lines = SYNTAX_ERROR.split("\n")
    assert start == sum(len(line) + 1 for line in lines[:3])
    assert SYNTAX_ERROR[start:end] == lines[3]
    expect(page.locator("#view")).to_be_hidden()  # no instance was created
    ui.shot("compile-error")
    # Editing the code clears the highlight (the line numbers may have moved).
    page.locator("#source").press("End")
    page.keyboard.type(":")
    expect(page.locator("#error-band")).to_be_hidden()
    ui.assert_clean()


def test_a_failing_workflow_shows_its_error(ui: Ui) -> None:
    from playwright.sync_api import expect

    page = ui.page
    ui.run(FAILING, "{}")
    expect(page.locator("#view-status")).to_have_text("errored", timeout=WAIT_MS)
    expect_step(ui, 0, "prepare", "complete")
    expect_step(ui, 1, "charge", "errored")
    expect(page.locator("#steps li").nth(1)).to_contain_text("card declined")
    expect(page.locator("#result-error")).to_contain_text("card declined")
    ui.shot("errored")
    ui.assert_clean()


def test_the_view_pauses_resumes_terminates_and_restarts(ui: Ui) -> None:
    from playwright.sync_api import expect

    page = ui.page
    status = page.locator("#view-status")
    ui.run(APPROVAL_FLOW, '{"sku": "P-7"}')
    expect_step(ui, 2, "approval", "waiting")
    page.locator('[data-action="pause"]').click()
    expect(status).to_have_text("paused", timeout=WAIT_MS)
    expect(page.locator("#action-message")).to_contain_text("pause: the instance is paused")
    expect(page.locator('[data-action="pause"]')).to_be_disabled()
    page.locator('[data-action="resume"]').click()
    expect(status).to_have_text("waiting", timeout=WAIT_MS)
    page.locator('[data-action="terminate"]').click()
    expect(status).to_have_text("terminated", timeout=WAIT_MS)
    expect(page.locator("#result")).to_contain_text("terminated")
    expect(page.locator("#send-event")).to_be_disabled()
    ui.shot("terminated")
    # A restart discards the journal and runs the instance again from the start.
    page.locator('[data-action="restart"]').click()
    expect_step(ui, 2, "approval", "waiting")
    expect(status).to_have_text("waiting", timeout=WAIT_MS)
    page.locator("#send-event").click()
    expect(status).to_have_text("complete", timeout=WAIT_MS)
    expect(page.locator("#result-output")).to_contain_text('"shipped": "P-7"')
    ui.assert_clean()


def test_a_retried_step_shows_its_attempts(ui: Ui) -> None:
    from playwright.sync_api import expect

    page = ui.page
    page.evaluate(RECORD_STEPS)
    ui.run(FLAKY, "{}")
    expect(page.locator("#view-status")).to_have_text("complete", timeout=WAIT_MS)
    expect_step(ui, 0, "flaky", "complete")
    expect(page.locator("#result-output")).to_contain_text('"attempt": 3')
    # Between attempts (a one-second durable wait) the step showed that it was retrying.
    seen: list[str] = page.evaluate("window.seenSteps")
    assert "flaky:retrying" in seen, seen
    assert seen.index("flaky:retrying") < seen.index("flaky:complete"), seen
    ui.assert_clean()


def test_tab_indents_and_shift_tab_dedents(ui: Ui) -> None:
    from playwright.sync_api import expect

    page = ui.page
    editor = page.locator("#source")
    editor.fill("def f():\nreturn 1\nreturn 2")
    editor.evaluate("(el) => { const i = el.value.indexOf('return'); el.setSelectionRange(i, i); }")
    editor.focus()
    page.keyboard.press("Tab")
    expect(editor).to_have_value("def f():\n    return 1\nreturn 2")
    page.keyboard.press("Shift+Tab")
    expect(editor).to_have_value("def f():\nreturn 1\nreturn 2")
    # A selection over several lines indents and dedents them all.
    page.keyboard.press("Control+a")
    page.keyboard.press("Tab")
    expect(editor).to_have_value("    def f():\n    return 1\n    return 2")
    page.keyboard.press("Shift+Tab")
    expect(editor).to_have_value("def f():\nreturn 1\nreturn 2")
    # At the very start, before an empty first line.
    editor.fill("\nx")
    editor.evaluate("(el) => el.setSelectionRange(0, 0)")
    page.keyboard.press("Tab")
    expect(editor).to_have_value("    \nx")
    # Enter keeps the indentation, one level more after a colon.
    editor.fill("if ready:")
    editor.press("End")
    page.keyboard.press("Enter")
    page.keyboard.type("go()")
    expect(editor).to_have_value("if ready:\n    go()")
    # The gutter numbers every line; Esc then Tab leaves the editor (no keyboard trap).
    expect(page.locator("#gutter div")).to_have_count(2)
    page.keyboard.press("Escape")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") != "source"
    ui.assert_clean()


# ---------------------------------------------------------------------- instances browser


def test_the_instances_browser_opens_another_tenants_instance(
    ui: Ui, shared_server: ServeProcess
) -> None:
    from playwright.sync_api import expect

    created = shared_server.admin("POST", "/v1/tenants/shop/instances", {"params": {"sku": "S-1"}})
    shop_id = created["id"]
    shared_server.wait_status("shop", shop_id, ("complete",))
    page = ui.page
    page.locator("#tab-browse").click()
    tenant = page.locator('#tenants button[data-tenant="shop"]')
    expect(tenant).to_be_visible(timeout=WAIT_MS)
    tenant.click()
    row = page.locator(f'#instances tr[data-id="{shop_id}"]')
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(row).to_contain_text("complete")
    # The status filter asks the server for that status only.
    page.locator("#status-filter").select_option("errored")
    expect(row).to_be_hidden(timeout=WAIT_MS)
    expect(page.locator("#instances-empty")).to_be_visible()
    page.locator("#status-filter").select_option("complete")
    expect(row).to_be_visible(timeout=WAIT_MS)
    ui.shot("instances")
    row.locator("button").click()
    expect(page.locator("#view-tenant")).to_have_text("shop", timeout=WAIT_MS)
    expect(page.locator("#view-id")).to_have_text(shop_id)
    expect(page.locator("#view-status")).to_have_text("complete", timeout=WAIT_MS)
    expect_step(ui, 0, "reserve", "complete")
    expect_step(ui, 1, "invoice", "complete")
    expect(page.locator("#result-output")).to_contain_text('"invoiced": "S-1"')
    # The view's address opens it again after a reload.
    page.reload()
    expect(page.locator("#view-id")).to_have_text(shop_id, timeout=WAIT_MS)
    expect(page.locator("#view-status")).to_have_text("complete", timeout=WAIT_MS)
    ui.shot("other-tenant")
    ui.assert_clean()


# ---------------------------------------------------------------------- the token


def test_without_the_token_the_page_answers_401(
    browser: Browser, shared_server: ServeProcess, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport=LAPTOP)
    try:
        page = context.new_page()
        response = page.goto(f"{shared_server.url}/playground")
        assert response is not None and response.status == 401
        expect(page.locator("form")).to_be_visible()
        api = context.request.get(f"{shared_server.url}/v1/playground")
        assert api.status == 401
        assert api.json()["error"]["code"] == "unauthorized"
        page.screenshot(path=str(tmp_path / "login.png"))
        # The login form trades the token for the session cookie.
        page.locator("#token").fill(shared_server.token)
        page.locator("button[type=submit]").click()
        expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
        assert page.url == f"{shared_server.url}/playground"
        assert context.request.get(f"{shared_server.url}/v1/playground").status == 200
        cookies = {c["name"]: c for c in context.cookies()}
        session = cookies["tenantflow_session"]
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # page scripts cannot read it
    finally:
        context.close()


# ---------------------------------------------------------------------- usable


def test_a_narrow_window_stacks_the_panes(
    browser: Browser, shared_server: ServeProcess, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    ui = open_ui(browser, shared_server, tmp_path, viewport=NARROW)
    try:
        page = ui.page
        page.locator("#reset-example").click()  # the example, with its example payload
        page.locator("#run").click()
        expect_step(ui, 0, "check order", "complete")
        expect_step(ui, 1, "cool off", "complete")
        expect_step(ui, 2, "approval", "waiting")
        expect_step(ui, 3, "charge", "pending")
        # Nothing is wider than the window, and the panes are stacked.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        left = page.locator(".left").bounding_box()
        right = page.locator(".right").bounding_box()
        assert left is not None and right is not None
        assert right["y"] >= left["y"] + left["height"]
        ui.shot("narrow")
        page.locator("#send-event").click()  # the example event: approved by alice
        expect(page.locator("#view-status")).to_have_text("complete", timeout=WAIT_MS)
        expect(page.locator("#result-output")).to_contain_text('"approved_by": "alice"')
        expect(page.locator("#logs")).to_contain_text("charging 12, approved by alice")
        ui.assert_clean()
    finally:
        ui.page.context.close()


#: What the browser logs, and nothing else is allowed, while the supervisor restarts: the
#: open event stream is cut (its chunked body never ends) and, while no supervisor
#: listens, each reconnection attempt is refused.
_RESTART_NOISE = (
    re.compile(r"^console: Failed to load resource: net::ERR_INCOMPLETE_CHUNKED_ENCODING$"),
    re.compile(r"^console: Failed to load resource: net::ERR_CONNECTION_REFUSED$"),
)


def test_the_live_view_survives_a_supervisor_restart(
    browser: Browser, serve_factory: ServeFactory, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    server = serve_factory()
    ui = open_ui(browser, server, tmp_path)
    try:
        page = ui.page
        ui.run(SLEEPY, "{}")
        expect_step(ui, 0, "first", "complete")
        expect_step(ui, 1, "nap", "waiting")
        expect(page.locator("#view-conn")).to_have_attribute("data-state", "live")
        instance_id = page.locator("#view-id").inner_text()

        server.stop()  # mid-run: the instance sleeps, its timer is in the database
        expect(page.locator("#view-conn")).to_have_attribute(
            "data-state", "reconnecting", timeout=WAIT_MS
        )
        ui.shot("reconnecting")
        server.start()  # same port, same SQLite file

        expect(page.locator("#view-conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        # The new supervisor woke the instance; the view follows it there.
        expect_step(ui, 1, "nap", "complete")
        expect_step(ui, 2, "approval", "waiting")
        page.locator("#event-payload").fill('{"by": "erin"}')
        page.locator("#send-event").click()
        expect(page.locator("#view-status")).to_have_text("complete", timeout=WAIT_MS)
        expect(page.locator("#result-output")).to_contain_text('"by": "erin"')
        assert page.locator("#view-id").inner_text() == instance_id
        assert server.admin("GET", f"/v1/tenants/playground/instances/{instance_id}")["output"] == {
            "first": "one",
            "by": "erin",
        }
        ui.shot("after-restart")
        ui.assert_clean(_RESTART_NOISE)
    finally:
        ui.page.context.close()
