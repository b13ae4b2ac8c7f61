"""The README's screenshot of `vaelab explore`: a trained run served, driven in headless Chromium.

    OMP_NUM_THREADS=1 python docs/explore_screenshot.py RUN docs/figures/explore.png
    OMP_NUM_THREADS=1 python docs/explore_screenshot.py CVAE_RUN docs/figures/explore-cvae.png Sneaker

The mouse stops over the plane, two clicks make an interpolation, a 2 is drawn on the pad and
the decoded grid is switched on, as a user would; then the window is saved as a PNG. For a
conditional run, the class named third is picked in the page's selector first.
"""

from __future__ import annotations

import sys
import threading
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from vaelab import runtime
from vaelab.checkpoint import load_run
from vaelab.explore import LatentSpace, make_server
from vaelab.data import load_training_data


def main(run_dir: str, out: str, class_name: str | None = None) -> None:
    runtime.configure()
    run = load_run(run_dir)
    server = make_server(LatentSpace.from_run(run, load_training_data(run.train_config, quiet=True)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1250,980",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        driver.get(server.url)
        time.sleep(1)
        if class_name is not None:
            Select(driver.find_element(By.ID, "class-select")).select_by_visible_text(class_name)
            time.sleep(1)
        driver.find_element(By.ID, "show-grid").click()
        overlay = driver.find_element(By.ID, "overlay")
        ActionChains(driver).move_to_element_with_offset(overlay, -150, 120).click() \
            .move_to_element_with_offset(overlay, 110, -110).click().perform()
        pad = driver.find_element(By.ID, "pad")
        if class_name is None:  # a 2
            ActionChains(driver).move_to_element_with_offset(pad, -70, -60).click_and_hold() \
                .move_by_offset(30, -40).move_by_offset(50, 0).move_by_offset(25, 35).move_by_offset(-10, 45) \
                .move_by_offset(-100, 80).move_by_offset(120, 0).release().perform()
        else:  # a bag: its body, then its handle
            ActionChains(driver).move_to_element_with_offset(pad, -80, -30).click_and_hold() \
                .move_by_offset(160, 0).move_by_offset(0, 110).move_by_offset(-160, 0).move_by_offset(0, -110) \
                .release().move_by_offset(50, 0).click_and_hold().move_by_offset(0, -50).move_by_offset(60, 0) \
                .move_by_offset(0, 50).release().perform()
        ActionChains(driver).move_to_element_with_offset(overlay, 40, -60).perform()
        time.sleep(2)
        driver.save_screenshot(out)
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
