"""``diffusereg watch``: the session (steps, Stop, controls), its HTTP server, the command, and the
page end to end in a real browser (Debian's Chromium driven by Playwright).

The model is the tiny untrained 2D pipeline on a coarse grid (``coarse_tiny_model``, conftest.py):
its fields are noise with many folds, so the guidance tests compare against its own unguided run.
The browser test is skipped, with the reason, where Playwright for Python (``pip install -e
".[browser]"``) or Chromium is missing (``.ci/run`` installs both; ``DIFFUSEREG_CHROMIUM`` names
another binary).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from diffusereg import DEFAULT_STEPS
from diffusereg.cli import main
from diffusereg.data import PairFiles
from diffusereg.guidance import SmoothnessGuidance
from diffusereg.io import read_displacement_field, read_grid, read_image, write_image
from diffusereg.phantom import cardiac_phantom, write_phantom
from diffusereg.guidance import GuidanceSpec
from diffusereg.pipelines import ModelGridBatch
from diffusereg.pipelines import load_pipeline
from diffusereg.registration import RegistrationError, RegistrationSettings, register_pair
from diffusereg.watch import LiveGuidance, WatchServer, WatchSession
from diffusereg.watch.frames import DISPLAY_PIXELS, deformed_grid

ENDED = ("finished", "stopped", "failed")
CHROMIUM = Path(os.environ.get("DIFFUSEREG_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def pipe(coarse_tiny_model: Path):
    return load_pipeline(str(coarse_tiny_model))


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> PairFiles:
    return write_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def session(pipe, phantom_files: PairFiles, tmp_path: Path) -> Iterator[WatchSession]:
    session = WatchSession(pipe, tmp_path / "session", model_name="coarse-tiny")
    session.load(phantom_files)
    yield session
    session.close()


def follow(session: WatchSession, react: Callable[[dict[str, Any]], None] = lambda snapshot: None,
           timeout: float = 60.0) -> list[dict[str, Any]]:
    """Snapshots from now until the registration ends; ``react`` sees each one as it comes."""
    snapshots, version = [], -1
    while not snapshots or snapshots[-1]["status"] not in ENDED:
        newer = session.wait(version, timeout)
        assert newer > version, f"nothing happened for {timeout} s"
        snapshots.append(session.snapshot())
        version = snapshots[-1]["version"]
        react(snapshots[-1])
    return snapshots


def png_size(data_url: str) -> tuple[int, int]:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return PILImage.open(io.BytesIO(base64.b64decode(data_url[len(prefix):]))).size


# ---------------------------------------------------------------------------------- the session
def test_every_step_is_shown_and_the_register_outputs_are_written(session: WatchSession):
    session.start(steps=4)
    snapshots = follow(session)
    steps = [s["step"] for s in snapshots]
    assert steps == sorted(steps) and steps[-1] == 4 and snapshots[-1]["status"] == "finished"
    last = snapshots[-1]
    assert set(last["pictures"]) == {"fixed", "moving", "warped", "difference", "jacobian"}
    assert all(png_size(url) == (DISPLAY_PIXELS, DISPLAY_PIXELS) for url in last["pictures"].values())
    assert last["metrics"]["dice"].keys() == last["metrics_before"]["dice"].keys() >= {"LV", "Myo", "RV"}
    assert last["metrics"] != last["metrics_before"]
    metrics = json.loads((session.output_dir / "metrics.json").read_text())
    assert last["result"] == metrics and metrics["steps_run"] == 4 and metrics["model"] == "coarse-tiny"
    with zipfile.ZipFile(io.BytesIO(session.download())) as archive:
        assert sorted(archive.namelist()) == sorted(metrics["outputs"])
        assert {"warped.nii.gz", "warped_labels.nii.gz", "field.h5", "jacobian.nii.gz"} <= set(archive.namelist())


def test_stop_keeps_the_result_of_the_step_it_stopped_at(session: WatchSession, pipe, phantom_files: PairFiles,
                                                         tmp_path: Path):
    session.start(steps=40)
    final = follow(session, react=lambda s: session.stop() if s["step"] >= 2 else None)[-1]
    steps_run = final["result"]["steps_run"]
    assert final["status"] == "stopped" and 2 <= steps_run < 40 and final["step"] == steps_run

    def stop_at_the_same_step(pipe, step: int, timestep: int, kwargs: dict) -> dict:
        pipe.interrupt = step + 1 == steps_run
        return kwargs

    reference = tmp_path / "reference"
    # in a thread, as the session registers: on a busy CPU torch can be many times slower in the main thread
    thread = threading.Thread(target=register_pair, args=(pipe, phantom_files.fixed, phantom_files.moving, reference,
                                                          RegistrationSettings(steps=40), phantom_files.fixed_labels,
                                                          phantom_files.moving_labels),
                              kwargs={"callbacks": [stop_at_the_same_step]})
    thread.start()
    thread.join()
    assert np.array_equal(read_image(session.output_dir / "warped.nii.gz").array,
                          read_image(reference / "warped.nii.gz").array)
    fixed_grid = read_grid(phantom_files.fixed)
    assert np.array_equal(read_displacement_field(session.output_dir / "field.h5", fixed_grid),
                          read_displacement_field(reference / "field.h5", fixed_grid))


def test_samples_give_a_spread_map_and_the_seed_changes_the_field(session: WatchSession,
                                                                   phantom_files: PairFiles):
    fields = []
    for seed in (0, 1):
        session.start(steps=2, samples=2, seed=seed)
        final = follow(session)[-1]
        assert final["result"]["samples"] == 2 and final["result"]["seed"] == seed and final["result"]["steps"] == 2
        assert "sample_spread.nii.gz" in final["result"]["outputs"]
        assert png_size(final["pictures"]["sample_spread"]) == (DISPLAY_PIXELS, DISPLAY_PIXELS)
        assert final["sample_spread_max_mm"] > 0
        fields.append(read_displacement_field(session.output_dir / "field.h5", read_grid(phantom_files.fixed)))
    assert not np.allclose(fields[0], fields[1])


def test_a_3d_model_is_shown_slice_by_slice(coarse_tiny_model_3d: Path, phantom_files: PairFiles, tmp_path: Path):
    session = WatchSession(load_pipeline(str(coarse_tiny_model_3d)), tmp_path)
    session.load(phantom_files)
    try:
        session.start(steps=2, samples=2)
        final = follow(session)[-1]
    finally:
        session.close()
    assert final["status"] == "finished" and final["slices"] == 32 and final["result"]["steps_run"] == 2
    assert {name: png_size(url) for name, url in final["pictures"].items()} == {
        name: (DISPLAY_PIXELS, DISPLAY_PIXELS)
        for name in ("fixed", "moving", "warped", "difference", "jacobian", "sample_spread")}


def test_guidance_switched_on_while_sampling_acts_from_the_next_step(session: WatchSession):
    session.start(steps=6)
    unguided = follow(session)[-1]["result"]
    guides = [GuidanceSpec.parse(text) for text in ("organ=3:1", "smoothness=0.3", "folds")]
    seen: list[int] = []

    def switch_on(snapshot: dict[str, Any]) -> None:
        if snapshot["step"] >= 2 and not seen:
            seen.append(snapshot["step"])
            session.steer(guides)

    session.start(steps=6)
    guided = follow(session, react=switch_on)[-1]["result"]
    (history,) = guided["guidance"]
    first = int(history.rsplit(" ", 1)[-1])
    assert history == f"live: none from step 1, organ=3:1 smoothness=0.3 folds from step {first}" and first > seen[0]
    assert unguided["NJD_percent"] > 10 and guided["NJD_percent"] < 0.1
    assert guided["dice_after"]["LV"] > unguided["dice_after"]["LV"]
    assert session.snapshot()["guidance"] == ["organ=3:1", "smoothness=0.3", "folds"]  # kept for the next one


def test_live_guidance_uses_the_specs_set_before_each_step():
    image = torch.rand(1, 1, 8, 8)
    live = LiveGuidance([], labels=None).bind(ModelGridBatch.from_arrays(image, image, None, 2, 1), 1)
    assert not live.is_active(0, 4)
    live.set([GuidanceSpec("smoothness", 0.1)])
    assert live.is_active(1, 4) and live.is_active(2, 4)
    field = torch.randn(1, 2, 8, 8)
    assert torch.equal(live.correct(field, image, image), SmoothnessGuidance(scale=0.1).correct(field, image, image))
    assert str(live) == "live: none from step 1, smoothness=0.1 from step 2"


def test_the_deformed_grid_moves_with_the_warp():
    def full_rows(field: np.ndarray) -> list[int]:
        return np.flatnonzero(deformed_grid(field, factor=1, every=4.0).all(axis=1)).tolist()

    still = np.zeros((2, 16, 16), dtype=np.float32)
    pulled_from_below = still + np.array([2.0, 0.0], dtype=np.float32)[:, None, None]
    assert full_rows(still) == [3, 7, 11]
    assert full_rows(pulled_from_below) == [1, 5, 9, 13]  # warped(x) = moving(x + 2 rows): lines move up


def test_the_slice_slider_picks_the_slice_the_pictures_show(session: WatchSession):
    first = session.snapshot()
    assert first["slices"] == 8 and first["step"] == 0
    other = (first["slice"] + 3) % first["slices"]
    session.view(other)
    moved = session.snapshot()
    assert moved["slice"] == other and moved["pictures"]["fixed"] != first["pictures"]["fixed"]


def test_controls_refuse_what_cannot_work(session: WatchSession, phantom_files: PairFiles):
    for bad, message in [(lambda: session.steer([GuidanceSpec("organ", 1.0, 7)]), "label 7"),
                         (lambda: session.steer([GuidanceSpec("smoothness", -1.0)]), "scale"),
                         (lambda: session.start(steps=0), "steps"),
                         (lambda: session.start(samples=100), "samples"),
                         (lambda: session.view(8), "slice 8"),
                         (session.download, "nothing to download"),
                         (lambda: session.store_upload("case.mhd", b"x"), "upload an image")]:
        with pytest.raises(RegistrationError, match=message):
            bad()
    session.start(steps=200)
    try:
        for busy in (lambda: session.start(), lambda: session.load(phantom_files)):
            with pytest.raises(RegistrationError, match="running"):
                busy()
    finally:
        session.stop()
        follow(session)


# ---------------------------------------------------------------------------------- the server
@pytest.fixture
def server(session: WatchSession) -> Iterator[WatchServer]:
    server = WatchServer(session, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.close()
    thread.join()


def request(server: WatchServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    answer = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return answer


def post(server: WatchServer, path: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, body = request(server, "POST", path, json.dumps(data).encode(), {"Content-Type": "application/json"})
    return status, json.loads(body)


def test_the_page_loads_nothing_from_elsewhere(server: WatchServer):
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and b'src="/page.js"' in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    for path in ("/", "/page.js", "/page.css"):
        status, _, body = request(server, "GET", path)
        assert status == 200 and b"http:" not in body and b"https:" not in body and b"//cdn" not in body, path


def test_uploaded_files_become_the_case(server: WatchServer, tmp_path: Path):
    phantom = cardiac_phantom(seed=3, shape=(4, 96, 96))
    numbers = {}
    for role, image in (("fixed", phantom.ed), ("moving", phantom.es)):
        write_image(image, tmp_path / f"{role} scan.mha")
        status, _, body = request(server, "PUT", f"/api/upload?name={role}%20scan.mha",
                                  (tmp_path / f"{role} scan.mha").read_bytes())
        assert status == 200
        numbers[role] = json.loads(body)["upload"]
    assert post(server, "/api/load", numbers) == (200, {"ok": True})
    snapshot = server.session.snapshot()
    assert snapshot["inputs"]["fixed"] == "fixed_scan.mha" and snapshot["inputs"]["fixed_labels"] is None
    assert snapshot["labels"] == [] and "dice" not in snapshot["metrics"]
    status, reply = post(server, "/api/guidance", {"guidance": ["organ=3"]})
    assert status == 400 and "label 3" in reply["error"]


def test_the_event_stream_sends_the_session(server: WatchServer):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("GET", "/events")
    response = connection.getresponse()
    assert response.getheader("Content-Type") == "text/event-stream"
    line = response.fp.readline()
    connection.close()
    assert line.startswith(b"data: ")
    event = json.loads(line[len(b"data: "):])
    assert event["status"] == "idle" and event["step"] == 0 and event["pictures"]["warped"].startswith("data:image/png")


def test_requests_another_site_could_send_are_refused(server: WatchServer):
    assert request(server, "GET", "/", headers={"Host": "attacker.example:7860"})[0] == 403  # DNS rebinding
    status, _, _ = request(server, "POST", "/api/stop", b"{}", {"Content-Type": "application/json",
                                                                 "Origin": "http://attacker.example"})
    assert status == 403
    assert request(server, "POST", "/api/stop", b"{}", {"Content-Type": "text/plain"})[0] == 400
    assert request(server, "GET", "/elsewhere")[0] == 404
    assert post(server, "/api/register", {"steps": "many"})[0] == 400


# ---------------------------------------------------------------------------------- the command
def test_watch_warns_when_it_listens_beyond_this_computer(coarse_tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]):
    def interrupted(self: WatchServer, poll_interval: float = 0.5) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(WatchServer, "serve_forever", interrupted)
    assert main(["watch", "--model", str(coarse_tiny_model), "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert "open http://127.0.0.1:" in out and "warning" not in err
    assert main(["watch", "--model", str(coarse_tiny_model), "--host", "0.0.0.0", "--port", "0"]) == 0
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err


@pytest.mark.slow
def test_watch_removes_its_temporary_folder_when_terminated(coarse_tiny_model: Path, tmp_path: Path):
    """SIGTERM left ``diffusereg-watch-*`` in the temporary folder (issue 32)."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    command = subprocess.Popen([sys.executable, "-m", "diffusereg.cli", "watch", "--model", str(coarse_tiny_model),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(temporary), "HF_HUB_OFFLINE": "1"})
    try:
        line = command.stdout.readline()  # printed once the session and server are up
        assert "open http://127.0.0.1:" in line, command.stderr.read()
        assert list(temporary.glob("diffusereg-watch-*"))
        command.send_signal(signal.SIGTERM)
        command.wait(timeout=60)
    finally:
        command.kill()
    assert command.returncode == 0, command.stderr.read()
    assert not list(temporary.glob("diffusereg-watch-*"))


def test_watch_needs_both_images_or_none(coarse_tiny_model: Path, phantom_files: PairFiles,
                                         capsys: pytest.CaptureFixture[str]):
    assert main(["watch", str(phantom_files.fixed), "--model", str(coarse_tiny_model)]) == 2
    assert "give FIXED and MOVING, or neither" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- in a browser
@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason='Playwright for Python is not installed (pip install -e ".[browser]")')
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium, or set DIFFUSEREG_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_in_a_browser_register_the_phantom_watch_it_stop_it_and_download_the_outputs(browser, server: WatchServer,
                                                                                    tmp_path: Path):
    from playwright.sync_api import expect

    steps = 400  # far more than run before Stop is pressed
    context = browser.new_context(accept_downloads=True, viewport={"width": 1360, "height": 900})
    page = context.new_page()
    requested: list[str] = []
    errors: list[str] = []  # JavaScript errors, and loads the Content-Security-Policy refused
    page.on("request", lambda request: requested.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url)
    expect(page.locator("#step")).to_have_text(f"step 0 / {DEFAULT_STEPS}")
    expect(page.locator("#inputs")).to_contain_text("moving.nii.gz → fixed.nii.gz")
    expect(page.locator("#organs label")).to_have_text([" RV", " Myo", " LV"])

    page.fill("#steps", str(steps))
    page.click("#register")
    expect(page.locator("#status")).to_have_text(re.compile("running|stopping"))
    expect(page.locator("#step")).to_have_text(re.compile(rf"step ([3-9]|[1-9]\d+) / {steps}"), timeout=60_000)
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped", timeout=60_000)

    shown = int(page.locator("#step").get_attribute("data-step"))
    assert 3 <= shown < steps
    for name in ("fixed", "moving", "warped", "difference", "jacobian"):
        assert png_size(page.locator(f"#picture-{name}").get_attribute("src")) == (DISPLAY_PIXELS, DISPLAY_PIXELS)
    expect(page.locator("#spread-figure")).to_be_hidden()  # one sample
    expect(page.locator("#metrics")).to_contain_text(f"step {shown}")
    expect(page.locator("#result")).to_contain_text(f"{shown} of {steps} steps")

    with page.expect_download() as download:
        page.click("#download")
    archive_path = tmp_path / download.value.suggested_filename
    download.value.save_as(archive_path)
    with zipfile.ZipFile(archive_path) as archive:
        metrics = json.loads(archive.read("metrics.json"))
        assert metrics["steps_run"] == shown and metrics["steps"] == steps
        assert sorted(archive.namelist()) == sorted(metrics["outputs"])

    origin = server.url.rstrip("/")
    elsewhere = [url for url in requested if not url.startswith((origin + "/", "data:"))]
    assert requested and not elsewhere
    assert not errors
    context.close()
