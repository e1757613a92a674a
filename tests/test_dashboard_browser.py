"""The dashboard in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
Selenium with the driver path given, so Selenium Manager downloads nothing).

Streams frames coded by the edge encoder into the live server over gRPC, holds the stream open, and
checks what the scripts render on each page at 1400 px: the stream row with its sparklines (Live), the
boxes over the frame canvas (Frame view), the result of an upload (Try it), the curves (Rate–accuracy),
and Swagger UI's operations (/docs, from local assets). Over a second server with the image bundle
(tests/test_dashboard_tasks.py builds it): the rebuilt picture under a mask and a pose's keypoints
(Frame view), and Try it with a task and a preview. Screenshots go to ``$PALETTELINK_ARTIFACTS``
(default ``test-artifacts/`` in the repository, ignored by git).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[1]
WIDTH = 1400
CLIENT = "browser-test"

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs /usr/bin/chromium and /usr/bin/chromedriver "
                                       "(apt-get install chromium chromium-driver; scripts/setup.sh tries)")


@pytest.fixture(scope="module")
def artifacts() -> Path:
    d = Path(os.environ.get("PALETTELINK_ARTIFACTS") or REPO / "test-artifacts") / "dashboard"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a selenium WebDriver
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as ChromeService

    os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: Selenium Manager must not fetch
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync",
                 f"--window-size={WIDTH},1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console: CSP violations, failed loads
    driver = webdriver.Chrome(service=ChromeService(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def open_stream(live_server, bundle, images):  # noqa: ANN001, ANN201
    """A gRPC stream of 6 frames (baseline at levels 3..8, coded by the edge encoder) held open until
    the module's tests are done."""
    from palettelink.codecs import make_encoder
    from palettelink.image import load_image

    enc = make_encoder(bundle, "baseline")
    analysis = enc.analyse(load_image(images[0]))
    payloads = [enc.encode_analysis(analysis, lv).payload for lv in (3, 4, 5, 6, 7, 8)]
    answered, release = threading.Semaphore(0), threading.Event()

    def reqs():  # noqa: ANN202
        yield pb.StreamRequest(header=pb.StreamHeader(bundle="fall-yolov8", client_id=CLIENT))
        for i, p in enumerate(payloads):
            yield pb.StreamRequest(frame=pb.Frame(frame_id=i + 1, payload=p))
        release.wait(120)

    with grpc.insecure_channel(live_server.grpc_address) as ch:
        call = palettelink_pb2_grpc.PaletteLinkStub(ch).Stream(reqs(), timeout=180)

        def read() -> None:
            for r in call:
                assert not r.result.HasField("error"), r.result.error
                answered.release()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        for _ in payloads:
            assert answered.acquire(timeout=60)
        yield live_server
        release.set()
        t.join(30)


def wait_for(driver, css: str, timeout: float = 15.0, count: int = 1):  # noqa: ANN001, ANN201
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        lambda d: (els := d.find_elements(By.CSS_SELECTOR, css)) and len(els) >= count and els)


def fits(driver) -> None:  # noqa: ANN001
    """Nothing wider than the window: no page scroll sideways, every table inside its box."""
    page_w = driver.execute_script("return document.documentElement.scrollWidth")
    assert page_w <= WIDTH, f"page is {page_w} px wide at {WIDTH} px"
    over = driver.execute_script(
        "return [...document.querySelectorAll('.scroll')].filter(e => e.scrollWidth > e.clientWidth + 1)"
        ".map(e => e.querySelector('table').id + ': ' + e.scrollWidth + ' > ' + e.clientWidth)")
    assert not over, over


def shot(driver, artifacts: Path, name: str) -> None:  # noqa: ANN001
    driver.save_screenshot(str(artifacts / f"{name}.png"))
    assert (artifacts / f"{name}.png").stat().st_size > 5000


def test_live_page(browser, open_stream, artifacts: Path) -> None:  # noqa: ANN001
    browser.get(open_stream.http_url + "/")
    from selenium.webdriver.support.ui import WebDriverWait

    tr = WebDriverWait(browser, 15).until(lambda d: next(
        (r for r in d.find_elements("css selector", "#streams tbody tr") if CLIENT in r.text), None))
    assert "baseline/8" in tr.text and "fall-yolov8/1" in tr.text
    for cls in ("kbit", "level"):
        d = tr.find_element("css selector", f"svg.{cls} path").get_attribute("d")
        assert d.count("L") + d.count("V") >= 5, (cls, d)  # 6 frames drawn
    wait_for(browser, "#frames tbody tr td.n")  # recent frames filled by its poll
    wait_for(browser, "#bundles tbody tr code")
    fits(browser)
    shot(browser, artifacts, "live")


def test_frame_view(browser, open_stream, artifacts: Path) -> None:  # noqa: ANN001
    browser.get(open_stream.http_url + "/frame")
    boxes = wait_for(browser, "#frame g.box", count=3)
    assert all(b.find_element("css selector", "text").text.split()[-1].startswith("0.") for b in boxes)
    assert browser.find_element("css selector", "#frame").get_dom_attribute("viewBox") == "0 0 810 1080"
    assert "Feature streams carry no pixels" in browser.find_element("css selector", ".note").text
    assert not browser.find_elements("css selector", "#frame image")  # the neutral canvas
    assert CLIENT in browser.find_element("css selector", "#stream").text
    fits(browser)
    shot(browser, artifacts, "frame")


def test_try_it(browser, live_server, images, artifacts: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.support.ui import Select

    browser.get(live_server.http_url + "/try")
    wait_for(browser, "#try-level option")
    Select(browser.find_element("css selector", "#try-codec")).select_by_visible_text("baseline")
    Select(browser.find_element("css selector", "#try-level")).select_by_value("3")
    browser.find_element("css selector", "#try-file").send_keys(str(images[0]))
    browser.find_element("css selector", "#try-form button").click()
    wait_for(browser, "#try-out[data-done] figure", timeout=60, count=2)
    coded, ref = browser.find_elements("css selector", "#try-out figure")
    assert "baseline/3" in coded.text and "baseline/8" in ref.text
    assert int(coded.find_element("css selector", ".bytes").text) < int(ref.find_element("css selector",
                                                                                          ".bytes").text)
    assert ref.find_elements("css selector", "g.box") and ref.find_elements("css selector", "image")
    assert browser.find_element("css selector", "#try-error").text == ""
    fits(browser)
    shot(browser, artifacts, "try")
    # a file that is not an image: the page shows the server's error, the server keeps answering
    bad = artifacts / "not-an-image.png"
    bad.write_bytes(b"not an image at all")
    browser.find_element("css selector", "#try-file").send_keys(str(bad))
    browser.find_element("css selector", "#try-form button").click()
    err = wait_for(browser, "#try-error")[0]
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: "not an image" in err.text)
    assert "INVALID_ARGUMENT" in err.text
    bad.unlink()


def test_rate_accuracy(browser, live_server, artifacts: Path) -> None:  # noqa: ANN001
    browser.get(live_server.http_url + "/rate")
    curves = wait_for(browser, "#rate path.curve", count=3)
    methods = {c.get_attribute("data-method") for c in curves}
    assert {"baseline", "palette", "jpeg"} <= methods
    assert all(len(c.get_attribute("d")) > 10 for c in curves)
    assert "bench-eval.json" in browser.find_element("css selector", "#rate-source").text
    fits(browser)
    shot(browser, artifacts, "rate")


def test_pages_run_under_the_content_security_policy(browser, open_stream) -> None:  # noqa: ANN001
    """Every page under its CSP (no source elsewhere, inline code only by hash): nothing refused in the
    console, no failed load (the favicon included: no 401/404), the scripts ran (each page filled),
    the rate legend coloured through the DOM, not a style attribute."""
    url = open_stream.http_url
    browser.get_log("browser")  # drop what earlier tests left
    for path, css in (("/", "#streams tbody tr"), ("/frame", "#frame-info"), ("/try", "#try-bundle option"),
                      ("/rate", "#rate-legend i"), ("/docs", ".swagger-ui .opblock")):
        browser.get(url + path)
        wait_for(browser, css)
        time.sleep(0.5)  # late loads (icons, event stream)
        logs = [e["message"] for e in browser.get_log("browser")]
        assert not [m for m in logs if "Content Security Policy" in m or "Failed to load" in m
                    or "favicon" in m], (path, logs)
        icon = browser.execute_script("return (document.querySelector('link[rel=icon]') || {}).href")
        if path != "/docs":
            assert icon == url + "/favicon.ico", (path, icon)
    browser.get(url + "/rate")
    wait_for(browser, "#rate-legend i", count=3)
    colours = browser.execute_script("return [...document.querySelectorAll('#rate-legend i')]"
                                     ".map(i => getComputedStyle(i).backgroundColor)")
    assert len(set(colours)) >= 3 and "rgba(0, 0, 0, 0)" not in colours, colours
    browser.get(url + "/try")
    wait_for(browser, "#try-bpp")
    assert browser.find_element("css selector", "#try-bpp").get_attribute("placeholder") == "bpp"


def test_docs_offline(browser, live_server, artifacts: Path) -> None:  # noqa: ANN001
    browser.get(live_server.http_url + "/docs")
    ops = wait_for(browser, ".swagger-ui .opblock", count=5)
    assert any("/api/try" in o.text for o in ops)
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(live_server.http_url) for u in urls), urls
    shot(browser, artifacts, "docs")


# -- the image bundle's tasks: the rebuilt picture, masks, keypoints ------------------------------------

NATURAL_SIZE = """const src = document.querySelector(arguments[0]).getAttribute("href");
return new Promise(done => { const i = new Image(); i.onload = () => done([i.naturalWidth, i.naturalHeight]);
                             i.onerror = () => done(null); i.src = src; });"""


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory, images):  # noqa: ANN001, ANN201
    """A server over the image bundle (its tasks' results made known where the codec is a tiny one),
    with a segment and a pose stream already run, each asking for the preview."""
    from test_dashboard_tasks import coded_image, image_root, image_service, stream

    from server.main import PaletteLinkServer

    root, _ = image_root(tmp_path_factory)
    srv = PaletteLinkServer(image_service(root))
    srv.start()
    srv.load()
    bus = coded_image(srv.service.resolve("vision-image").bundle, images[0])
    for task in ("segment", "pose"):
        stream(srv.grpc_address, task, [bus], f"browser-{task}")
    yield srv
    srv.stop(grace=1.0)


def choose_stream(driver, client: str) -> None:  # noqa: ANN001
    from selenium.webdriver.support.ui import Select, WebDriverWait

    WebDriverWait(driver, 15).until(lambda d: client in d.find_element("css selector", "#stream").text)
    pick = Select(driver.find_element("css selector", "#stream"))
    pick.select_by_value(next(o.get_attribute("value") for o in pick.options if client in o.text))


def test_frame_view_draws_the_picture_masks_and_keypoints(browser, image_server, artifacts: Path) -> None:  # noqa: ANN001
    browser.get(image_server.http_url + "/frame")
    choose_stream(browser, "browser-segment")
    wait_for(browser, "#frame image.preview")
    wait_for(browser, "#frame image.mask")
    svg = browser.find_element("css selector", "#frame")
    assert svg.get_dom_attribute("viewBox") == "0 0 810 1080"
    assert svg.get_dom_attribute("data-preview").endswith("/preview.jpg")  # the stored picture, fetched
    assert browser.execute_script(NATURAL_SIZE, "#frame image.preview") == [810, 1080]
    assert browser.execute_script(NATURAL_SIZE, "#frame image.mask") == [810, 1080]  # the RLE, decoded
    assert "1 mask" in browser.find_element("css selector", "#frame-info").text
    fits(browser)
    shot(browser, artifacts, "frame-segment")

    choose_stream(browser, "browser-pose")
    dots = wait_for(browser, "#frame g.pose circle", count=5)
    assert browser.find_elements("css selector", "#frame g.pose line")  # the skeleton's limbs
    assert not browser.find_elements("css selector", "#frame image.mask")
    assert dots and browser.find_elements("css selector", "#frame image.preview")
    assert browser.execute_script(NATURAL_SIZE, "#frame image.preview") == [810, 1080]
    shot(browser, artifacts, "frame-pose")

    browser.get(image_server.http_url + "/")  # the recent frames link their pictures
    links = wait_for(browser, "#frames a.preview-link", count=2)
    assert all(a.get_attribute("href").endswith("/preview.jpg") for a in links)
    fits(browser)


def test_try_it_with_a_task_and_a_preview(browser, image_server, images, artifacts: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(image_server.http_url + "/try")
    wait_for(browser, "#try-level option")
    Select(browser.find_element("css selector", "#try-bundle")).select_by_visible_text("vision-image/1")
    WebDriverWait(browser, 5).until(lambda d: "pose" in d.find_element("css selector", "#try-task").text)
    tasks = [o.text for o in Select(browser.find_element("css selector", "#try-task")).options]
    assert tasks == ["detect", "segment", "landmarks", "pose", "preview"]
    Select(browser.find_element("css selector", "#try-task")).select_by_visible_text("pose")
    browser.find_element("css selector", "#try-preview").click()
    browser.find_element("css selector", "#try-file").send_keys(str(images[0]))
    browser.find_element("css selector", "#try-form button").click()
    wait_for(browser, "#try-out[data-done] figure", timeout=90, count=2)
    coded = browser.find_elements("css selector", "#try-out figure")[0]
    assert "over the picture the server rebuilt" in coded.text and "pose" in coded.text
    picture = coded.find_element("css selector", "svg").get_dom_attribute("data-preview")
    assert picture.endswith("/preview.jpg")
    assert coded.find_elements("css selector", "g.pose circle")
    assert browser.execute_script(NATURAL_SIZE, "#try-out figure svg image.preview") == [810, 1080]
    assert browser.find_element("css selector", "#try-error").text == ""
    fits(browser)
    shot(browser, artifacts, "try-pose")


# -- with tokens: the login form and the session cookie ---------------------------------------------

TOKEN = "browser-s3cret"


@pytest.fixture(scope="module")
def token_server(server_service):  # noqa: ANN001, ANN201 - server.main.PaletteLinkServer
    """A second in-process server over the same Service, with one token."""
    from server.auth import TokenAuth
    from server.main import PaletteLinkServer

    srv = PaletteLinkServer(server_service, auth=TokenAuth({TOKEN: "browser-user"}))
    srv.start()
    srv.load()
    yield srv
    srv.stop(grace=1.0, close_service=False)


def test_login_with_a_token(browser, token_server, artifacts: Path) -> None:  # noqa: ANN001
    """A page load lands on the login form; a wrong token is refused there; the right one opens the
    page asked for, whose scripts, event stream and Swagger UI then run on the HttpOnly,
    SameSite=Strict session cookie (the token itself never reaches the page); "log out" ends it."""
    from selenium.webdriver.support.ui import WebDriverWait

    url = token_server.http_url
    browser.get(url + "/rate")
    WebDriverWait(browser, 15).until(lambda d: "/login" in d.current_url)
    assert browser.current_url == url + "/login?next=%2Frate"
    wait_for(browser, "#token")[0].send_keys("not-the-token")
    browser.find_element("css selector", "#login button").click()
    assert "unknown token" in wait_for(browser, "#login-error")[0].text
    shot(browser, artifacts, "login")
    wait_for(browser, "#token")[0].send_keys(TOKEN)
    browser.find_element("css selector", "#login button").click()
    WebDriverWait(browser, 15).until(lambda d: d.current_url == url + "/rate")
    wait_for(browser, "#rate path.curve", count=3)  # /api/bench answered with the cookie

    (cookie,) = [c for c in browser.get_cookies() if c["name"] == "palettelink_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    assert browser.execute_script("return document.cookie") == ""  # scripts cannot read it

    browser.get(url + "/")
    wait_for(browser, "#bundles tbody tr code")  # /api/info
    wait_for(browser, "#streams tbody tr")  # filled by the first event of /api/live
    WebDriverWait(browser, 15).until(lambda d: d.find_element("css selector", "#state").text == "ready")
    browser.get(url + "/docs")
    wait_for(browser, ".swagger-ui .opblock", count=5)  # /openapi.json and the Swagger assets

    browser.get(url + "/")
    wait_for(browser, "#logout")[0].click()
    WebDriverWait(browser, 15).until(lambda d: "/login" in d.current_url)
    assert not [c for c in browser.get_cookies() if c["name"] == "palettelink_session"]
    browser.get(url + "/frame")
    WebDriverWait(browser, 15).until(lambda d: "/login" in d.current_url)
