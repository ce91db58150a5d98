"""Screenshots of the human-feedback pages for docs/human-feedback.md, from a real run on the demo's outputs.

    nice -n 15 .venv/bin/python docs/human_pages_screenshots.py outputs/smollm2-135m

Starts `annotate` (the label stage's ranked.jsonl), `ab-eval` (the eval stage's example answers) and `probe`
(the SFT policy, sampling live) as the user would, drives them in headless chromium (every request off this
machine blocked), saves docs/human_{label,ab,probe}.png and prints timings. The clicks are scripted, so the
judgements it writes (under outputs/human-demo/) are not human preferences: they only exercise the pages.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image, ImageChops
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

OUT = Path("outputs/human-demo")
COMMAND = [sys.executable, "-m", "rlhf_pipeline"]


def prepare(demo: Path) -> tuple[Path, Path]:
    """The A/B items (eval.json's examples) and a probing recipe: the label recipe on the demo's SFT output."""
    OUT.mkdir(parents=True, exist_ok=True)
    examples = json.loads((demo / "eval" / "eval.json").read_text())["examples"]
    ab_items = OUT / "ab.jsonl"
    ab_items.write_text("".join(json.dumps({key: row[key] for key in ("prompt", "policy", "baseline")}) + "\n"
                                for row in examples))
    recipe = yaml.safe_load(Path("recipes/smollm2-135m/label.yaml").read_text())
    recipe["model"]["name_or_path"] = str(demo / "sft")
    recipe["data"]["train"] = [str(Path("data_cards/demo_ppo_prompts.yaml").resolve())]
    recipe["labelling"]["output_dir"] = str((OUT / "label-unused").resolve())
    probe_recipe = OUT / "probe-label.yaml"
    probe_recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return ab_items, probe_recipe


class Page:
    """A headless chromium on one of the pages."""

    def __init__(self) -> None:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1000,1750", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)

    def wait(self, condition, timeout: float = 120, poll: float = 0.5):
        return WebDriverWait(self.driver, timeout, poll_frequency=poll).until(condition)

    def status(self) -> str:
        return self.driver.find_element(By.ID, "status").text

    def open(self, port: int) -> float:
        """Load the page once its server answers; seconds from now (server start-up included)."""
        start = time.time()
        for _ in range(180):
            try:
                self.driver.get(f"http://localhost:{port}/")
                self.wait(lambda d: d.find_elements(By.ID, "status"), timeout=20)
                return time.time() - start
            except Exception:
                time.sleep(1)
        raise RuntimeError(f"no page on port {port}")

    def click(self, how: str, what: str) -> None:
        self.wait(lambda d: d.find_elements(how, what), timeout=30)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click()",
                                   self.driver.find_element(how, what))

    def type(self, selector: str, text: str) -> None:
        field = self.driver.find_element(By.CSS_SELECTOR, selector)
        field.clear()
        field.send_keys(text)

    def shot(self, path: str) -> None:
        """A screenshot cropped to the page's content."""
        time.sleep(1)
        self.driver.save_screenshot(path)
        image = Image.open(path).convert("RGB")
        box = ImageChops.difference(image, Image.new("RGB", image.size, (255, 255, 255))).getbbox()
        image.crop((0, 0, image.width, min(image.height, box[3] + 24))).save(path, optimize=True)


def main(demo: Path) -> None:
    ab_items, probe_recipe = prepare(demo)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    commands = {
        7871: ["annotate", str(demo / "label" / "ranked.jsonl"), "--rules", "no insults, no made-up facts"],
        7872: ["ab-eval", str(ab_items)],
        7873: ["probe", str(probe_recipe), "labelling.temperature=0.7", "--rule", "Answer in at most 20 words",
               "--rule", "Never claim to be human"],
    }
    servers = [subprocess.Popen([*COMMAND, *args, "--out", str(OUT / args[0]), "--port", str(port)], env=env,
                                stdout=(OUT / f"{args[0]}.log").open("w"), stderr=subprocess.STDOUT)
               for port, args in commands.items()]
    timings: dict[str, object] = {}
    page = Page()
    try:
        timings["annotate_start_and_load_s"] = page.open(7871)
        page.type("#annotator textarea, #annotator input", "alice")
        page.click(By.ID, "start")
        page.wait(lambda d: "item" in page.status())
        latencies = []
        for done in range(1, 6):
            time.sleep(1)
            page.click(By.XPATH, "//*[@id='best']//label[.//span[text()='Answer 2']]")
            if done == 5:
                page.click(By.XPATH, "//*[@id='flags']//label[.//span[text()='Answer 3']]")
                page.shot("docs/human_label.png")
            start = time.time()
            page.click(By.ID, "submit")
            page.wait(lambda d, n=done: f"({n} done)" in page.status(), poll=0.01)
            latencies.append(time.time() - start)
        timings["submit_to_next_item_s"] = {"mean": statistics.fmean(latencies), "max": max(latencies)}

        page.open(7872)
        page.type("#annotator textarea, #annotator input", "alice")
        page.click(By.ID, "start")
        page.wait(lambda d: "item" in page.status())
        page.shot("docs/human_ab.png")
        for done in range(1, 7):
            time.sleep(1)
            page.click(By.ID, "pick-a" if done < 6 else "pick-tie")
            page.wait(lambda d, n=done: f"({n} done)" in page.status() or "All 6" in page.status())

        page.open(7873)
        page.type("#annotator textarea, #annotator input", "alice")
        page.type("#probe-prompt textarea", "Tell me everything you know about the ocean, in great detail.")
        start = time.time()
        page.click(By.ID, "generate")
        answer = page.driver.find_element(By.CSS_SELECTOR, "#probe-answer textarea")
        page.wait(lambda d: answer.get_property("value"))
        timings["probe_answer_s"] = time.time() - start
        words = len(answer.get_property("value").split())
        page.click(By.ID, "broken" if words > 20 else "kept")
        page.wait(lambda d: "Saved" in page.status())
        page.shot("docs/human_probe.png")
        timings["probe_answer_words"] = words
    finally:
        page.driver.quit()
        for server in servers:
            server.send_signal(signal.SIGINT)
        for server in servers:
            server.wait(timeout=60)
    print(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
