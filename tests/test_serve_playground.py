"""The playground page in a real headless Chromium: type a prompt, watch the completion stream in, coloured by depth."""

import re
import shutil

import pytest
import torch

pytest.importorskip("starlette", reason="mor serve needs the serve extra: pip install 'mor[serve]'")
pytest.importorskip("uvicorn", reason="mor serve needs the serve extra: pip install 'mor[serve]'")
pytest.importorskip("selenium", reason="the browser test needs selenium (the dev extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from helpers import END_TOKENS, ServerProcess, write_checkpoint  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from mor.infer.streaming import depth_palette  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,  # a server process and a browser
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="the browser test needs Chromium and its "
                                 "driver: apt-get install chromium chromium-driver")]
PROMPT = "Once upon a time"


def rgb(colour: str) -> tuple[int, ...]:
    """(r, g, b) of "#rrggbb" or of a computed "rgb(r, g, b)" / "rgba(r, g, b, a)"."""
    if colour.startswith("#"):
        return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return tuple(int(v) for v in re.findall(r"\d+", colour)[:3])


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,800",
                     f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_playground_streams_a_completion_coloured_by_depth(tmp_path, browser):
    folder = tmp_path / "tiny-mor"
    folder.mkdir()
    model = write_checkpoint(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=48, eos_token_id=END_TOKENS)
    generated = out.sequences()[0]
    depths = set(out.depths[0, :len(generated)].tolist())
    server = ServerProcess(folder, tmp_path / "server.log")
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        for field, value in (("max-tokens", "48"), ("temperature", "0")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#output span.token"))
        WebDriverWait(browser, 30).until(lambda b: "finished" in b.find_element(By.ID, "status").text)
        browser.save_screenshot(str(tmp_path / "playground.png"))

        spans = browser.find_elements(By.CSS_SELECTOR, "#output span.token")
        palette = depth_palette(model.config.num_recursions)
        painted = {int(s.get_attribute("data-depth")): rgb(s.value_of_css_property("background-color"))
                   for s in spans}
        assert len(painted) > 1, "tokens of several depths should show in several colours"
        assert set(painted) <= depths
        assert all(colour == rgb(palette[d]) for d, colour in painted.items())
        text = tokenizer.decode([t for t in generated if t not in END_TOKENS])
        assert browser.find_element(By.ID, "output").get_attribute("textContent") == PROMPT + text
        assert f"{len(generated)} tokens" in browser.find_element(By.ID, "status").text
    finally:
        server.stop()
