"""A real headless browser (Debian's chromium through selenium; nothing downloaded) and pages served on free ports.

Skipped, with the reason, where gradio, selenium or chromium are missing: `make test` installs all three.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def browser() -> Iterator[Callable[[], Any]]:
    """A factory of headless chromium sessions; each is closed at the end (a test may quit one mid-way)."""
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def start() -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,1500", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost"):
            options.add_argument(flag)  # the last one: any request off this machine fails, so none is needed
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.implicitly_wait(0)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        with contextlib.suppress(Exception):  # a test may have quit it already
            driver.quit()


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    """Launch Gradio pages on free ports without blocking; returns each page's URL, closes them at the end."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from rlhf_pipeline.human.serve import launch

    pages = []

    def start(page: Any) -> str:
        pages.append(page)
        return launch(page, "127.0.0.1", free_port(), block=False)

    yield start
    for page in pages:
        page.close()
