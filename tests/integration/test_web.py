"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) against the local cluster with tiny models: the page only talks to the public API."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from shared.core.constants import FRAME_S
from shared.core.preview import WIDTH
from tests.integration.conftest import Cluster
from tests.integration.test_cluster import SHORT

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
WAIT_S = 60


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1500",
        "--mute-audio",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(argument)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    prefs = {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    options.add_experimental_option("prefs", prefs)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, script: str, *args: object) -> object:
    """Waits until `script` (a function body returning a value) is truthy; returns the value.
    On timeout, says what the page showed (its error line, the job on show, the console)."""
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
            lambda d: d.execute_script(script, *args)
        )
    except TimeoutException:
        shown = driver.execute_script(
            "return {error: document.getElementById('error').textContent,"
            " job: {...document.getElementById('job').dataset},"
            " log: document.getElementById('job-log').textContent};"
        )
        raise AssertionError(
            f"{script!r} never held: {shown}; {driver.get_log('browser')}"
        ) from None


def _finished_job(driver: WebDriver, not_id: str | None = None) -> str:
    """The id of the job on show once it succeeded (a job other than `not_id`)."""
    return str(
        _wait(
            driver,
            "const s = document.getElementById('job');"
            "return s.dataset.state === 'succeeded' && s.dataset.jobId !== arguments[0]"
            " && !document.getElementById('song').hidden && s.dataset.jobId;",
            not_id,
        )
    )


def test_make_hear_download_and_inpaint_a_song(
    local_cluster: Cluster, browser: WebDriver, tmp_path: Path
) -> None:
    cluster = local_cluster
    browser.get(f"{cluster.url}/")
    browser.find_element(By.ID, "api-key").send_keys(cluster.keys["alice"])
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    _wait(browser, "return document.getElementById('key-state').textContent.includes('…');")

    form = browser.find_element(By.ID, "song-form")
    form.find_element(By.NAME, "tags").send_keys(SHORT["tags"])
    form.find_element(By.NAME, "lyrics").send_keys(SHORT["lyrics"])
    duration = form.find_element(By.NAME, "duration_s")
    duration.clear()
    duration.send_keys(str(SHORT["duration_s"]))
    form.find_element(By.NAME, "seed").send_keys(str(SHORT["seed"]))
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    # progress moves: the page's live log shows running states between 0 and 100 %, in order
    song_id = _finished_job(browser)
    log = browser.execute_script(
        "return [...document.querySelectorAll('#job-log li')]"
        ".map(li => [li.dataset.state, li.dataset.stage, Number(li.dataset.progress)]);"
    )
    running = [(stage, progress) for state, stage, progress in log if state == "running"]
    assert "generating" in {stage for stage, _ in running}, log
    percents = [progress for _, progress in running]
    assert percents == sorted(percents) and any(0 < p < 100 for p in percents), log
    assert log[-1][0] == "succeeded"
    listed = browser.find_element(By.CSS_SELECTOR, f'#job-list button[data-job-id="{song_id}"]')
    assert "succeeded" in listed.text

    # play it: the audio element's duration is the song's, to within a frame
    metadata = json.loads(cluster.artifact("alice", song_id, "metadata.json").content)
    played = browser.execute_async_script(
        "const [done, player] = [arguments[arguments.length - 1], "
        "document.getElementById('player')];"
        "player.play().then(() => done(true), (error) => done(String(error)));"
    )
    assert played is True, played
    audio_s = _wait(
        browser,
        "const p = document.getElementById('player');"
        "return p.currentTime > 0.1 && Number.isFinite(p.duration) && p.duration;",
    )
    assert abs(float(audio_s) - metadata["duration_s"]) <= FRAME_S
    assert metadata["duration_s"] == pytest.approx(SHORT["duration_s"])
    preview_width = browser.execute_script(
        "return document.getElementById('preview').naturalWidth;"
    )
    assert preview_width == WIDTH

    # download it: the file the browser saved is the artifact
    browser.find_element(By.CSS_SELECTOR, '#downloads button[data-artifact="audio.flac"]').click()
    saved = tmp_path / "downloads" / f"{song_id[:8]}-audio.flac"
    deadline = time.monotonic() + WAIT_S
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert saved.read_bytes() == cluster.artifact("alice", song_id, "audio.flac").content

    # inpaint the middle half, chosen by dragging across the waveform
    preview = browser.find_element(By.ID, "preview")
    width = preview.size["width"]
    ActionChains(browser).move_to_element_with_offset(
        preview, -width // 4, 0
    ).click_and_hold().move_by_offset(width // 2, 0).release().perform()
    inpaint = browser.find_element(By.ID, "inpaint-form")
    start_s = float(inpaint.find_element(By.NAME, "start_s").get_attribute("value") or "nan")
    end_s = float(inpaint.find_element(By.NAME, "end_s").get_attribute("value") or "nan")
    pixel_s = metadata["duration_s"] / width
    assert start_s == pytest.approx(metadata["duration_s"] / 4, abs=2 * pixel_s + 0.01)
    assert end_s == pytest.approx(metadata["duration_s"] * 3 / 4, abs=2 * pixel_s + 0.01)
    browser.save_screenshot(str(tmp_path / "web-page.png"))
    inpaint.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    repaired_id = _finished_job(browser, not_id=song_id)
    repaired = cluster.job("alice", repaired_id)
    assert repaired["type"] == "inpaint" and repaired["state"] == "succeeded"
    assert repaired["params"]["source_job_id"] == song_id
    assert (repaired["params"]["start_s"], repaired["params"]["end_s"]) == (start_s, end_s)

    # transcribe the repaired song: its transcript is shown, the segment at the playhead lit
    browser.find_element(By.CSS_SELECTOR, "#transcribe-form button[type=submit]").click()
    _wait(browser, "return document.querySelectorAll('#karaoke li').length > 0;")
    transcribed = cluster.http("alice").get(
        f"{cluster.url}/v1/jobs", params={"type": "transcribe"}, timeout=10
    )
    (transcription,) = [
        job for job in transcribed.json()["jobs"] if job["params"]["source_job_id"] == repaired_id
    ]
    transcript = json.loads(
        cluster.artifact("alice", transcription["id"], "transcript.json").content
    )
    shown_segments = browser.find_elements(By.CSS_SELECTOR, "#karaoke li[data-start]")
    assert len(shown_segments) == len(transcript["segments"])
    if transcript["segments"]:  # the tiny random-weight transcriber mostly hears nothing
        first = transcript["segments"][0]
        browser.execute_script(
            "const p = document.getElementById('player'); p.pause(); p.currentTime = arguments[0];",
            (first["start"] + first["end"]) / 2,
        )
        _wait(browser, "return document.querySelector('#karaoke li.current')?.textContent;")
        lit = browser.find_element(By.CSS_SELECTOR, "#karaoke li.current")
        assert float(lit.get_attribute("data-start") or "nan") == first["start"]

    # another tenant's job id: the API's 404, in the API's words
    other = cluster.submit("bob", "generate", {**SHORT, "duration_s": FRAME_S})
    refusal = cluster.http("alice").get(f"{cluster.url}/v1/jobs/{other['id']}", timeout=10)
    assert refusal.status_code == 404
    browser.find_element(By.ID, "open-id").send_keys(other["id"])
    browser.find_element(By.CSS_SELECTOR, "#open-form button[type=submit]").click()
    shown = _wait(
        browser,
        "const e = document.getElementById('error'); return !e.hidden && e.textContent;",
    )
    assert shown == refusal.json()["error"]["message"]
    assert browser.find_element(By.ID, "job").get_attribute("data-job-id") == repaired_id


KARAOKE_CHECK = """
const done = arguments[arguments.length - 1];
import("/web/karaoke.js").then(({ Karaoke }) => {
  const list = document.createElement("ol");
  const audio = Object.assign(new EventTarget(), { currentTime: 0 });
  new Karaoke(list, audio).show(arguments[0]);
  const lit = [];
  for (const time of [0.5, 1.2, 2.5, 9.0]) {
    audio.currentTime = time;
    audio.dispatchEvent(new Event("timeupdate"));
    lit.push([...list.querySelectorAll(".current")].map((node) => node.textContent));
  }
  done(lit);
}, (error) => done(String(error)));
"""


def test_karaoke_lights_the_segment_and_word_being_sung(
    local_cluster: Cluster, browser: WebDriver
) -> None:
    """The page's karaoke module in the browser, on a transcript.json with words (the tiny
    transcriber of the cluster test hears none)."""
    transcript = {
        "segments": [
            {"start": 0.0, "end": 1.0, "text": "hello world"},
            {
                "start": 1.0,
                "end": 3.0,
                "text": "la la",
                "words": [
                    {"start": 1.0, "end": 2.0, "word": "la"},
                    {"start": 2.0, "end": 3.0, "word": " la!"},
                ],
            },
        ]
    }
    browser.get(f"{local_cluster.url}/")
    lit = browser.execute_async_script(KARAOKE_CHECK, transcript)
    assert lit == [["hello world"], ["la la!", "la"], ["la la!", " la!"], []]
