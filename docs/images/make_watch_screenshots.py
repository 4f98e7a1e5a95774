"""Screenshots of ``diffusereg watch`` for docs/watch.md, taken in headless Chromium by Playwright.

Run from the repository root:  python docs/images/make_watch_screenshots.py [--model NAME]
Writes docs/images/watch_running.png (while sampling) and watch_stopped.png (after Stop). Without
--model it uses the untrained test model of make_figures.py, steered by organ-mask and smoothness
guidance ticked in the page; give a trained model (e.g. diffusereg/acdc-2d) to show its own
registration. Needs Debian's Chromium at /usr/bin/chromium and `pip install playwright`.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import threading

from make_figures import HERE, untrained_pipeline
from playwright.sync_api import expect, sync_playwright

from diffusereg import DEFAULT_STEPS
from diffusereg.pipelines import load_pipeline
from diffusereg.watch import WatchServer, WatchSession

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def take_screenshots(url: str, guided: bool) -> None:
    """Register the phantom (10 steps, 2 samples), shoot while it runs, press Stop, shoot again."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 860})
        page.goto(url)
        expect(page.locator("#step")).to_have_text(f"step 0 / {DEFAULT_STEPS}")
        page.fill("#steps", "10")
        page.fill("#samples", "2")
        if guided:
            page.check("#smoothness-on")
            page.fill("#smoothness-scale", "0.3")
            for box in page.locator("#organs input").all():
                box.check()
        page.click("#register")
        expect(page.locator("#step")).to_have_text(re.compile(r"step [4-9] / 10"), timeout=120_000)
        page.screenshot(path=HERE / "watch_running.png")
        page.click("#stop")
        expect(page.locator("#status")).to_have_text("stopped", timeout=120_000)
        page.screenshot(path=HERE / "watch_stopped.png", full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained pipeline (default: the untrained test model, guided)")
    args = parser.parse_args()
    pipe = untrained_pipeline() if args.model is None else load_pipeline(args.model)
    with tempfile.TemporaryDirectory() as folder:
        session = WatchSession(pipe, folder, model_name=args.model or "untrained test model")
        session.load_phantom()
        server = WatchServer(session, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            take_screenshots(server.url, guided=args.model is None)
        finally:
            server.shutdown()
            server.close()


if __name__ == "__main__":
    main()
