"""Headless Chromium driven over the DevTools protocol, for the end-to-end page tests.

One browser process per `Browser`, one page, on loopback only: the page's own JavaScript runs
and the test reads what it rendered (`evaluate`), waits for it (`wait_for`), and screenshots it.
The DevTools socket is `websockets`' synchronous client (installed with uvicorn[standard]).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import free_port

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.fail("no chromium: install it (apt-get install -y chromium; `make test` does as root)")


class Browser:
    """A headless Chromium with an empty profile in `profile`; close() ends it."""

    def __init__(self, profile: Path, timeout_s: float = 30) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [chromium(), *FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={port}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._next_id = 0
        self._closing = contextlib.ExitStack()
        try:
            self.socket = self._closing.enter_context(self._connect(port, timeout_s))
            self.call("Page.enable")
            self.call("Runtime.enable")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _connect(self, port: int, timeout_s: float) -> ClientConnection:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, "chromium exited at start"
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False).json()
                page = next(t for t in targets if t.get("type") == "page")
                return connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            except (httpx.TransportError, StopIteration):
                if time.monotonic() > deadline:
                    raise TimeoutError("chromium's DevTools endpoint did not come up") from None
                time.sleep(0.2)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are dropped)."""
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30) -> Any:
        """Poll `expression` until it is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression!r}")
            time.sleep(0.1)
        return value

    def answer_dialog(self, action: str, accept: bool, timeout_s: float = 30) -> str:
        """Run `action` (JavaScript that opens a `confirm()`, e.g. a button's click), then accept
        or dismiss the dialog as a person would; the dialog's message."""
        # later, not inside this evaluate: a dialog blocks the script until it is answered
        self.evaluate(f"setTimeout(() => {{ {action}; }}, 50)")
        deadline = time.monotonic() + timeout_s
        while True:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise AssertionError(f"no dialog opened after {action!r}")
            message = json.loads(self.socket.recv(timeout=left_s))
            if message.get("method") == "Page.javascriptDialogOpening":
                self.call("Page.handleJavaScriptDialog", accept=accept)
                return str(message["params"]["message"])

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self._closing.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# JavaScript: put the bytes at URL into a file input, as a person choosing a file would.
SET_FILE_JS = """(async (selector, url, name) => {
  const blob = await (await fetch(url, {headers: %s})).blob();
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], name, {type: blob.type}));
  const input = document.querySelector(selector);
  input.files = transfer.files;
  input.dispatchEvent(new Event("change", {bubbles: true}));
  return input.files.length;
})(%s, %s, %s)"""


def set_file(
    browser: Browser, selector: str, url: str, name: str, headers: dict[str, str] | None = None
) -> None:
    """Choose the file at `url` (fetched by the page) in the file input `selector`."""
    args = [json.dumps(x) for x in (headers or {}, selector, url, name)]
    assert browser.evaluate(SET_FILE_JS % tuple(args)) == 1
