"""nerfstudio's viewer on a tiny gridinr-fit run, started as ns-viewer starts it.

Headless: one render through the viewer's own render state machine, with a stand-in for the browser's
camera, must equal the model's render of the same camera; our transfer-function controls must be
discovered by the viewer, and changing one through viser must change the next render.
In a browser: headless Chromium opens the viewer page; screenshots must show the volume, and a control
changed through viser's API must change what the page shows.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as imageio
import numpy as np
import pytest
import torch
import viser.transforms as vtf
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.utils.eval_utils import eval_setup
from nerfstudio.viewer.render_state_machine import RenderStateMachine
from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO, Viewer
from nerfstudio.viewer.viewer_elements import ViewerElement

from gridinr_nerfstudio.data.orbit_cameras import look_at, pinhole_cameras
from gridinr_nerfstudio.stages.viewer_controls import StartCamera

MAX_RES = 96
"""The viewer's "Max res" for these tests: full-resolution renders stay quick on a CPU."""


def eye_at(radius: float, elevation_deg: float, azimuth_deg: float) -> torch.Tensor:
    elevation, azimuth = math.radians(elevation_deg), math.radians(azimuth_deg)
    return radius * torch.tensor(
        [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def viewer(tiny_fit_run, tmp_path) -> Iterator[Viewer]:
    """The viewer as ns-viewer sets it up (eval_setup in test mode, init_scene), on a free local port."""
    _, pipeline, _, step = eval_setup(tiny_fit_run, test_mode="test")
    config = ViewerConfig(websocket_host="127.0.0.1", websocket_port=free_port())
    state = Viewer(config, log_filename=tmp_path / "viewer_log_filename.txt",
                   datapath=pipeline.datamanager.get_datapath(), pipeline=pipeline, train_lock=threading.Lock())
    try:
        state.init_scene(train_dataset=pipeline.datamanager.train_dataset, train_state="completed",
                         eval_dataset=pipeline.datamanager.eval_dataset)
        state.update_scene(step=step)
        state.set_camera_visibility(False)  # the train cameras' thumbnails would show reference images in the page
        state.control_panel._max_res.value = MAX_RES
        yield state
    finally:
        state.viser_server.stop()


def our_elements(viewer: Viewer) -> dict[str, ViewerElement]:
    return {path.split("/")[-1]: element for path, element in viewer.viewer_elements}


def set_control(viewer: Viewer, name: str, value, settings_changed: Callable[[], bool]) -> None:
    """Set a control's value through viser (as a browser edit does) and wait for the model to take it."""
    our_elements(viewer)[name].value = value  # viser runs the update callbacks in its thread pool
    wait_for(settings_changed, 10, f"{name} = {value!r} to reach the model")


class BrowserStandIn:
    """What the render state machine uses of a viser client: the browser's camera and its background image."""

    def __init__(self, eye: torch.Tensor, fov_degrees: float) -> None:
        c2w = look_at(eye[None])[0].double().numpy()
        # viser cameras look down +z (OpenCV); nerfstudio turns them by pi about x (see Viewer.get_camera_state).
        wxyz = (vtf.SO3.from_matrix(c2w[:, :3]) @ vtf.SO3.from_x_radians(np.pi)).wxyz
        self.camera = SimpleNamespace(position=c2w[:, 3] * VISER_NERFSTUDIO_SCALE_RATIO, wxyz=wxyz,
                                      fov=math.radians(fov_degrees), aspect=1.0)
        self.scene = SimpleNamespace(set_background_image=self.receive)
        self.images: list[np.ndarray] = []

    def receive(self, image: np.ndarray, **_) -> None:
        self.images.append(image)


def viewer_render(viewer: Viewer, browser: BrowserStandIn) -> np.ndarray:
    """One full-resolution render as the viewer's render thread makes and sends it."""
    machine = RenderStateMachine(viewer, VISER_NERFSTUDIO_SCALE_RATIO, browser)
    machine.state = "high"
    machine._send_output_to_viewer(machine._render_img(viewer.get_camera_state(browser)))
    return browser.images[-1]


def model_render(model, eye: torch.Tensor, fov_degrees: float) -> np.ndarray:
    """The same camera through the model directly, quantised as the viewer quantises (truncation)."""
    camera = pinhole_cameras(look_at(eye[None]), MAX_RES, fov_degrees).to(model.device)
    with torch.no_grad():
        rgb = model.get_outputs_for_camera(camera)["rgb"]
    return (rgb * 255).type(torch.uint8).cpu().numpy()


def test_viewer_discovers_our_render_controls(viewer):
    model = viewer.pipeline.model
    attributes = {name for name, value in vars(model).items() if isinstance(value, ViewerElement)}
    assert {"viewer_colormap", "viewer_opacity_low", "viewer_opacity_high", "viewer_opacity_scale", "viewer_samples",
            "viewer_shading", "viewer_background"} <= attributes
    paths = {path for path, _ in viewer.viewer_elements}
    assert paths == {f"Custom Elements/model/{name}" for name in attributes}
    assert all(element.gui_handle is not None for _, element in viewer.viewer_elements)  # installed in viser


def test_viewer_render_is_the_model_render_and_follows_controls(viewer):
    model, settings = viewer.pipeline.model, viewer.pipeline.model.render_settings
    eye, fov = eye_at(2.5, 20.0, 30.0), 45.0
    browser = BrowserStandIn(eye, fov)

    first = viewer_render(viewer, browser)
    assert first.shape == (MAX_RES, MAX_RES, 3) and first.dtype == np.uint8
    assert np.abs(first.astype(int) - model_render(model, eye, fov)).max() <= 1
    lit = first.max(axis=-1) > 40
    assert 0.1 < lit.mean() < 0.9  # the volume fills part of the view, the background the rest
    assert (first[0, 0] == 0).all() and (first[-1, -1] == 0).all()

    set_control(viewer, "viewer_colormap", "viridis", lambda: settings.colormap == "viridis")
    recoloured = viewer_render(viewer, browser)
    assert np.abs(recoloured.astype(int) - model_render(model, eye, fov)).max() <= 1
    assert np.abs(recoloured.astype(int) - first).mean() > 5
    # inferno is red over green everywhere; viridis is green over red
    assert (first[lit, 0] > first[lit, 1]).mean() > 0.8 and (recoloured[lit, 1] > recoloured[lit, 0]).mean() > 0.8

    set_control(viewer, "viewer_background", (255, 255, 255), lambda: settings.background == (1.0, 1.0, 1.0))
    assert (viewer_render(viewer, browser)[0, 0] >= 254).all()


class ClientStandIn:
    """What `StartCamera.place` uses of a viser client: `atomic()` and a camera whose pose it sets."""

    def __init__(self) -> None:
        self.camera = SimpleNamespace(position=None, look_at=None, up_direction=None, fov=None)

    @contextlib.contextmanager
    def atomic(self):
        yield


def test_viewer_clients_open_at_the_first_evaluation_camera(viewer):
    """A new client is placed where the run's first evaluation camera is (not viser's start camera near the centre
    of the volume): the viewer's render from that pose is the model's render of that evaluation camera."""
    model = viewer.pipeline.model
    (start,) = [control for control in viewer.viewer_controls if isinstance(control, StartCamera)]
    client = ClientStandIn()
    start.place(client)  # what viser calls for each new client (the browser test sees it happen)
    camera = client.camera
    eval_camera = viewer.pipeline.datamanager.eval_dataset.cameras[0]
    eval_c2w = eval_camera.camera_to_worlds.double()
    position = torch.as_tensor(camera.position, dtype=torch.float64) / VISER_NERFSTUDIO_SCALE_RATIO
    torch.testing.assert_close(position, eval_c2w[:, 3])
    assert float(position.norm()) == pytest.approx(2.5, abs=1e-6)  # the orbit, outside the volume
    assert tuple(camera.up_direction) == (0.0, 0.0, 1.0)

    c2w = look_at(position[None].float(), torch.as_tensor(camera.look_at, dtype=torch.float32)
                  / VISER_NERFSTUDIO_SCALE_RATIO, torch.tensor(camera.up_direction, dtype=torch.float32))[0]
    wxyz = (vtf.SO3.from_matrix(c2w[:, :3].double().numpy()) @ vtf.SO3.from_x_radians(np.pi)).wxyz
    browser = BrowserStandIn(position.float(), math.degrees(camera.fov))
    browser.camera.wxyz = wxyz  # the pose viser derives from position, look_at and up
    seen = viewer_render(viewer, browser)

    reference = pinhole_cameras(eval_c2w[None].float(), MAX_RES, math.degrees(camera.fov)).to(model.device)
    with torch.no_grad():
        expected = (model.get_outputs_for_camera(reference)["rgb"] * 255).type(torch.uint8).cpu().numpy()
    assert math.degrees(camera.fov) == pytest.approx(45.0, abs=1e-4)  # our cameras' field of view
    assert np.abs(seen.astype(int) - expected).max() <= 1
    assert 0.1 < (seen.max(axis=-1) > 40).mean() < 0.9  # the whole volume in view, not a close-up of its inside


# ---------------------------------------------------------------------------------------------------------
# In headless Chromium, as a person would see it.

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@contextlib.contextmanager
def headless_chromium(profile: Path) -> Iterator[int]:
    """Start headless Chromium with the DevTools protocol on a free port; yield that port; always stop it."""
    executable = next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)
    if executable is None:
        pytest.skip("Chromium is not installed (make browser-deps, or apt-get install chromium)")
    profile.mkdir(parents=True)
    log = profile.parent / "chromium.log"
    # --enable-unsafe-swiftshader keeps WebGL on the CPU (SwiftShader) where Chromium stops falling back to it itself.
    command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
               "--disable-quic", "--no-first-run", "--disable-breakpad", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               "--remote-debugging-port=0", "about:blank"]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"Chromium could not start: {log.read_text()[-500:]!r}")
            time.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # its own session: the browser and its helper processes
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class DevToolsPage:
    """One Chromium tab driven over the DevTools protocol (no domains enabled: replies only, no events)."""

    def __init__(self, devtools_port: int) -> None:
        import websocket

        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json", timeout=10).read())
        page = next(target for target in targets if target["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self) -> np.ndarray:
        return imageio.imread(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))[..., :3]

    def close(self) -> None:
        self.socket.close()


def canvas_box(page: DevToolsPage) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the 3D view: the narrowest large canvas (the control panel sits beside it)."""
    rects = page.evaluate(
        "JSON.stringify([...document.querySelectorAll('canvas')].map(c => c.getBoundingClientRect()))"
    )
    large = [r for r in json.loads(rects) if r["width"] >= 200 and r["height"] >= 200]
    assert large, f"no 3D canvas on the page: {rects}"
    rect = min(large, key=lambda r: r["width"])
    return int(rect["top"]) + 1, int(rect["bottom"]) - 1, int(rect["left"]) + 1, int(rect["right"]) - 1


def full_resolution_sent(viewer: Viewer) -> bool:
    """The stats line says the last image sent was rendered at "Max res" (the state machine's final step)."""
    width, height = viewer.stats_markdown.content.split("Resolution: ")[1].removesuffix("px").split("x")
    return max(int(width), int(height)) == MAX_RES


def settled_view(viewer: Viewer, page: DevToolsPage, timeout: float, unlike: np.ndarray | None = None) -> np.ndarray:
    """The 3D view once the full-resolution render is on screen and the layout has settled (and, given
    `unlike`, the view differs from it): two screenshots in a row agree, canvas box included."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        top, bottom, left, right = canvas_box(page)  # the canvas shrinks when the control panel mounts
        view = page.screenshot()[top:bottom, left:right]
        changed = unlike is None or view.shape != unlike.shape or np.abs(view.astype(int) - unlike).mean() > 3
        if full_resolution_sent(viewer) and changed and last is not None and np.array_equal(view, last):
            return view
        last = view
        time.sleep(0.5)
    raise AssertionError(f"the viewer page did not settle on a new render in {timeout:.0f} s")


def volume_pixels(view: np.ndarray) -> np.ndarray:
    """Pixels that are clearly not the black background."""
    return view.max(axis=-1) > 40


def test_viewer_page_in_headless_chromium_shows_the_volume(viewer, tmp_path):
    url = f"http://127.0.0.1:{viewer.viser_server.get_port()}/"
    with headless_chromium(tmp_path / "chromium-profile") as devtools_port:
        page = DevToolsPage(devtools_port)
        try:
            if not page.evaluate("!!document.createElement('canvas').getContext('webgl2')"):
                pytest.skip("this Chromium has no WebGL2 (software rendering unavailable); the viewer cannot draw")
            page.call("Emulation.setDeviceMetricsOverride", width=1000, height=700, deviceScaleFactor=1, mobile=False)
            page.call("Page.navigate", url=url)
            wait_for(lambda: "0x0px" not in viewer.stats_markdown.content, 60, "the page to connect and get a first render")
            first = settled_view(viewer, page, timeout=60)  # the camera the page opened with, never moved
            imageio.imwrite(tmp_path / "viewer_inferno.png", first)
            (client,) = viewer.viser_server.get_clients().values()
            eval_eye = viewer.pipeline.datamanager.eval_dataset.cameras[0].camera_to_worlds[:, 3].double().numpy()
            np.testing.assert_allclose(client.camera.position / VISER_NERFSTUDIO_SCALE_RATIO, eval_eye, atol=1e-4)

            lit = volume_pixels(first)
            assert 0.05 < lit.mean() < 0.8, f"{lit.mean():.3f} of the view is lit (screenshot {tmp_path})"
            rows, cols = np.nonzero(lit)
            height, width = lit.shape
            assert abs(rows.mean() / height - 0.5) < 0.15 and abs(cols.mean() / width - 0.5) < 0.15  # centred
            assert (first[lit, 0] > first[lit, 1]).mean() > 0.8  # inferno: red over green

            settings = viewer.pipeline.model.render_settings
            set_control(viewer, "viewer_colormap", "viridis", lambda: settings.colormap == "viridis")
            second = settled_view(viewer, page, timeout=60, unlike=first)
            imageio.imwrite(tmp_path / "viewer_viridis.png", second)
            lit = volume_pixels(second)
            assert lit.mean() > 0.05 and (second[lit, 1] > second[lit, 0]).mean() > 0.8  # viridis: green over red
        finally:
            page.close()
