"""The caption review page in a real browser (issue #34): Debian's chromium, driven by Selenium
through Debian's chromedriver (nothing is downloaded). Load, edit, tag chips, bulk replace,
keyboard save, the refusal of a file changed on disk and the reload that keeps the unsaved
edits, the refusal without the token; and the screenshot the README shows."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from review_fixtures import TOKEN, review_dataset, serving

from loramill.captions.edits import read_metadata

CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None or shutil.which("chromium") is None,
    reason="chromium and its driver are not installed (Debian: apt-get install chromium-driver)",
)
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "caption-review.png"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never fetches a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                     "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, tmp_path):
    dataset = review_dataset(tmp_path)
    with serving(dataset) as url:
        browser.get(f"{url}/?token={TOKEN}")
        wait_for(browser, lambda: len(cards(browser)) == 6)
        yield browser, dataset, url


def wait_for(browser, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda _: condition())


def cards(browser):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, "#images .card")


def find(root, selector):
    from selenium.webdriver.common.by import By

    return root.find_element(By.CSS_SELECTOR, selector)


def status(browser) -> str:
    return find(browser, "#status").text


def save_with_keys(browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(browser).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()


def edits(dataset) -> dict[str, tuple[str, str]]:
    found = read_metadata(dataset.root / "metadata.csv", dataset.root)
    return {key: (edit.text, edit.mode) for key, edit in found.items()}


def test_the_page_loads_every_image_and_an_edit_reaches_the_file(page):
    browser, dataset, _ = page
    first = cards(browser)[0]
    loaded = "[...document.querySelectorAll('.thumb')].every(i => i.complete && i.naturalWidth)"
    wait_for(browser, lambda: browser.execute_script(f"return {loaded}"))
    assert "zzt, stripes, band 0" in find(first, ".training").text
    prompt = find(first, ".prompt")
    prompt.send_keys("a red band, blurry")
    # the preview comes from the server: the merge stage's rules drop "blurry"
    wait_for(browser, lambda: find(first, ".training").text.endswith("zzt, a red band"))
    assert "1 unsaved edit" in status(browser)
    save_with_keys(browser)
    wait_for(browser, lambda: "saved 1 edit" in status(browser))
    image = first.get_attribute("data-image")
    assert edits(dataset) == {image[:-4]: ("a red band, blurry", "replace")}
    # a tag chip removes its tag; the new-tag box adds one
    first = cards(browser)[0]
    chips = first.find_elements("css selector", ".chip")
    next(chip for chip in chips if chip.text.startswith("blurry")).click()
    find(first, ".new-tag").send_keys("wide\n")
    wait_for(browser, lambda: find(cards(browser)[0], ".prompt").get_attribute("value")
             == "a red band, wide")  # fmt: skip
    find(browser, "#save").click()
    wait_for(browser, lambda: "saved 1 edit" in status(browser))
    assert edits(dataset)[image[:-4]] == ("a red band, wide", "replace")


def test_bulk_replace_and_tags_over_the_selection_or_the_whole_dataset(page):
    browser, dataset, _ = page
    for card in cards(browser)[:2]:
        find(card, ".select").click()
    find(browser, "#bulk-tag").send_keys("sks style")
    find(browser, "#add-tag").click()
    wait_for(browser, lambda: "2 unsaved edits" in status(browser))
    find(browser, "#scope").send_keys("the whole dataset")
    find(browser, "#find").send_keys("stripes")
    find(browser, "#replace").send_keys("bands")
    find(browser, "#replace-all").click()
    wait_for(browser, lambda: "6 unsaved edits" in status(browser))
    find(browser, "#save").click()
    wait_for(browser, lambda: "saved 6 edits" in status(browser))
    saved = edits(dataset)
    assert len(saved) == 6 and all(text.startswith("bands, band ") for text, _ in saved.values())
    assert sum(text.endswith(", sks style") for text, _ in saved.values()) == 2
    # the filter by tag shows the two, from the tag list
    next(b for b in browser.find_elements("css selector", ".tag-filter")
         if b.text.startswith("sks style")).click()  # fmt: skip
    wait_for(browser, lambda: sum(c.is_displayed() for c in cards(browser)) == 2)


def test_a_file_changed_on_disk_is_refused_and_the_reload_keeps_the_unsaved_text(page):
    browser, dataset, _ = page
    table = dataset.root / "metadata.csv"
    prompt = find(cards(browser)[1], ".prompt")
    prompt.send_keys("typed in the page")
    table.write_text("filename,prompt\nelsewhere.png,typed in a text editor\n")
    save_with_keys(browser)
    wait_for(browser, lambda: "changed on disk since the page read it" in status(browser))
    assert table.read_text() == "filename,prompt\nelsewhere.png,typed in a text editor\n"
    find(browser, "#reload").click()
    wait_for(browser, lambda: "1 unsaved edit(s) kept" in status(browser))
    assert find(cards(browser)[1], ".prompt").get_attribute("value") == "typed in the page"
    save_with_keys(browser)
    wait_for(browser, lambda: "saved 1 edit" in status(browser))
    assert table.read_text().startswith("filename,prompt\nelsewhere.png,typed in a text editor\n")
    assert "typed in the page" in table.read_text()


def test_keyboard_moves_between_images(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser, _, _ = page
    find(cards(browser)[0], ".prompt").click()
    ActionChains(browser).key_down(Keys.ALT).send_keys(Keys.ARROW_DOWN).key_up(Keys.ALT).perform()
    focused = browser.switch_to.active_element
    assert focused.get_attribute("class") == "prompt"
    assert browser.execute_script("return arguments[0].closest('.card').dataset.image", focused) \
        == cards(browser)[1].get_attribute("data-image")  # fmt: skip


def test_without_the_token_nothing_is_served(page):
    browser, _, url = page
    browser.get(f"{url}/")
    assert "needs the token" in browser.page_source
    browser.get(f"{url}/api/state?token=wrong")
    assert "403" in browser.page_source or "Forbidden" in browser.page_source


def test_the_readme_screenshot(page, tmp_path):
    """docs/caption-review.png, as the README shows it: written anew with
    LORAMILL_UPDATE_SCREENSHOT=1, else taken and checked to be a full page."""
    browser, _, _ = page
    find(cards(browser)[0], ".prompt").send_keys("a red band on black, sks style")
    find(cards(browser)[0], ".select").click()
    wait_for(browser, lambda: find(cards(browser)[0], ".training").text.startswith("zzt, a red"))
    out = SCREENSHOT if os.environ.get("LORAMILL_UPDATE_SCREENSHOT") else tmp_path / "shot.png"
    assert browser.save_screenshot(str(out))
    from PIL import Image

    with Image.open(out) as shot:
        assert shot.size == (1280, browser.execute_script("return window.innerHeight"))
    assert SCREENSHOT.is_file()


def select_all_and_type(element, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(text)


def test_text_typed_while_a_save_is_on_its_way_stays_unsaved(page, monkeypatch):
    """And a second Ctrl+S meanwhile waits for the first, instead of a false conflict."""
    from loramill.captions.review.table import Table

    browser, dataset, _ = page
    original = Table.save

    def slow(self, *args):
        time.sleep(1.5)
        return original(self, *args)

    monkeypatch.setattr(Table, "save", slow)
    find(cards(browser)[0], ".prompt").send_keys("first")
    wait_for(browser, lambda: "1 unsaved edit" in status(browser))
    save_with_keys(browser)
    save_with_keys(browser)
    find(cards(browser)[1], ".prompt").send_keys("second")
    wait_for(browser, lambda: "saved 1 edit" in status(browser))
    assert "1 unsaved edit" in status(browser) and "changed on disk" not in status(browser)
    second = cards(browser)[1]
    assert find(second, ".prompt").get_attribute("value") == "second"
    assert "dirty" in second.get_attribute("class")
    assert list(edits(dataset).values()) == [("first", "replace")]


def test_a_mode_chosen_before_the_text_or_kept_while_retyping_stays(page):
    from selenium.webdriver.support.ui import Select

    browser, dataset, _ = page
    card = cards(browser)[2]
    image = card.get_attribute("data-image")
    Select(find(card, ".mode")).select_by_value("append")
    assert find(card, ".mode").get_attribute("value") == "append"
    find(card, ".prompt").send_keys("sks style")
    wait_for(browser, lambda: find(card, ".training").text.endswith(", sks style"))
    save_with_keys(browser)
    wait_for(browser, lambda: "saved 1 edit" in status(browser))
    assert edits(dataset)[image[:-4]] == ("sks style", "append")
    select_all_and_type(find(card, ".prompt"), "")
    assert find(card, ".mode").get_attribute("value") == "append"
    select_all_and_type(find(card, ".prompt"), "wide")
    save_with_keys(browser)
    wait_for(browser, lambda: "saved 1 edit" in status(browser))
    assert edits(dataset)[image[:-4]] == ("wide", "append")


def test_a_draft_for_an_image_edited_in_captions_meanwhile_is_dropped_saying_so(page):
    browser, dataset, _ = page
    card = cards(browser)[3]
    find(card, ".prompt").send_keys("typed here")
    find(cards(browser)[4], ".prompt").send_keys("kept")
    sidecars = dataset.root / "captions"
    sidecars.mkdir()
    (sidecars / f"{Path(card.get_attribute('data-image')).stem}.txt").write_text("elsewhere\n")
    save_with_keys(browser)
    wait_for(browser, lambda: "change it there" in status(browser))
    find(browser, "#reload").click()
    wait_for(browser, lambda: "1 unsaved edit(s) dropped" in status(browser))
    assert find(cards(browser)[4], ".prompt").get_attribute("value") == "kept"
    save_with_keys(browser)
    wait_for(browser, lambda: "saved 1 edit" in status(browser))
    assert [text for text, _ in edits(dataset).values()] == ["kept"]


def test_modes_the_table_has_no_column_for_cannot_be_chosen(page):
    browser, dataset, url = page
    (dataset.root / "metadata.csv").write_text("filename,prompt\n")
    browser.get(f"{url}/?token={TOKEN}")
    wait_for(browser, lambda: len(cards(browser)) == 6)
    options = cards(browser)[0].find_elements("css selector", ".mode option")
    assert {o.get_attribute("value"): o.get_attribute("disabled") for o in options} == {
        "replace": None, "prepend": "true", "append": "true", "exclude": "true"}  # fmt: skip
