"""The pages in a real headless chromium: label, close the tab mid-way, reopen, finish; the files it wrote train
the rm stage unchanged; the probing and A/B pages record what was clicked. Nothing off this machine is fetched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.human.pages import ab_page, label_page, probe_page
from rlhf_pipeline.human.sessions import NO_NAME, ABSession, LabelSession, ProbeSession
from tests.human.items import answer, write_ab_items, write_items


def _by(kind: str) -> Any:
    from selenium.webdriver.common.by import By

    return getattr(By, kind)


def find(driver: Any, kind: str, selector: str) -> Any:
    """The element once the page has rendered it (Gradio draws its components a few at a time)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.find_elements(_by(kind), selector),
                                    message=f"the page never showed {selector}")
    return driver.find_element(_by(kind), selector)


def open_page(driver: Any, url: str) -> None:
    driver.get(url)
    find(driver, "ID", "status")


def wait_status(driver: Any, text: str) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: text in d.find_element(_by("ID"), "status").text,
                                    message=f"status never showed {text!r}")
    return driver.find_element(_by("ID"), "status").text


def type_into(driver: Any, element_id: str, text: str) -> None:
    field = find(driver, "CSS_SELECTOR", f"#{element_id} textarea, #{element_id} input")
    field.clear()
    field.send_keys(text)


def click(driver: Any, element_id: str) -> None:
    find(driver, "ID", element_id).click()


def tick(driver: Any, group: str, label: str) -> None:
    find(driver, "XPATH", f"//*[@id='{group}']//label[.//span[text()='{label}']]").click()


def shown_answers(driver: Any, count: int) -> list[str]:
    return [find(driver, "CSS_SELECTOR", f"#answer-{i} textarea").get_property("value")
            for i in range(count)]


def judge(driver: Any, item: int, best: int, flags: tuple[int, ...] = ()) -> None:
    """Pick the answer whose original index is `best` wherever it is shown, and flag the `flags` ones."""
    shown = shown_answers(driver, 3)
    tick(driver, "best", f"Answer {shown.index(answer(item, best)) + 1}")
    for original in flags:
        tick(driver, "flags", f"Answer {shown.index(answer(item, original)) + 1}")
    click(driver, "submit")


def off_machine_requests(driver: Any) -> list[str]:
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [url for url in urls if not url.startswith(("http://localhost", "http://127.0.0.1", "data:", "blob:"))]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_label_page_close_reopen_finish_and_rm_trains_on_it(tmp_path: Path, browser, serve, tiny_model_dir) -> None:
    items, out = write_items(tmp_path / "ranked.jsonl"), tmp_path / "human"
    url = serve(label_page(LabelSession(items, out, seed=5, rules="no insults")))
    first = browser()
    open_page(first, url)
    click(first, "start")
    assert wait_status(first, NO_NAME[:20]).startswith(NO_NAME[:20])  # an empty name: a message, nothing saved
    type_into(first, "annotator", "alice")
    click(first, "start")
    wait_status(first, "alice: item 1 of 4 (0 done)")
    judge(first, 0, best=2, flags=(0,))
    wait_status(first, "alice: item 2 of 4 (1 done)")
    click(first, "skip")
    wait_status(first, "alice: item 3 of 4 (2 done)")
    assert off_machine_requests(first) == []
    first.quit()  # the tab is closed mid-way: both judgements are already on disk
    assert [(r["item"], r["verdict"]) for r in lines(out / "judgements.jsonl")[1:]] == [(0, "best"), (1, "skip")]

    second = browser()
    open_page(second, url)
    type_into(second, "annotator", "alice")
    click(second, "start")
    wait_status(second, "alice: item 3 of 4 (2 done)")  # resumes at the first unlabelled item
    judge(second, 2, best=1)
    wait_status(second, "item 4 of 4")
    judge(second, 3, best=1, flags=(2,))
    wait_status(second, "All 4 items are done by alice")
    type_into(second, "annotator", "bob")
    click(second, "start")
    wait_status(second, "bob: item 1 of 4 (0 done)")
    judge(second, 0, best=2)
    wait_status(second, "bob: item 2 of 4 (1 done)")

    records = lines(out / "judgements.jsonl")[1:]
    assert [(r["annotator"], r["item"], r["verdict"], r["best"], r["flags"]) for r in records] == [
        ("alice", 0, "best", 2, [0]), ("alice", 1, "skip", None, []), ("alice", 2, "best", 1, []),
        ("alice", 3, "best", 1, [2]), ("bob", 0, "best", 2, [])]
    assert any(r["order"] != [0, 1, 2] for r in records)  # answers really were shuffled, and unshuffled above
    pairs = [(p["annotator"], p["chosen"], p["rejected"]) for p in lines(out / "preferences.jsonl")]
    assert pairs == [("alice", answer(0, 2), answer(0, 0)), ("alice", answer(0, 2), answer(0, 1)),
                     ("alice", answer(2, 1), answer(2, 0)), ("alice", answer(2, 1), answer(2, 2)),
                     ("alice", answer(3, 1), answer(3, 0)), ("alice", answer(3, 1), answer(3, 2)),
                     ("bob", answer(0, 2), answer(0, 0)), ("bob", answer(0, 2), answer(0, 1))]
    flagged = [(r["annotator"], r["answer"]) for r in lines(out / "classified.jsonl") if r["label"] == 1]
    assert flagged == [("alice", answer(0, 0)), ("alice", answer(3, 2))]
    card = yaml.safe_load((out / "data_card.yaml").read_text())
    assert card["size"] == {"rows": 8, "prompts": 3, "judgements": 5, "per_annotator": {"alice": 4, "bob": 1}}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["agreement"]["annotators"]["pairs"]["alice vs bob"] == {"items": 1, "agreement": 1.0,
                                                                           "cohen_kappa": None}
    assert summary["counts"]["verdicts"] == {"best": 4, "skip": 1}

    from rlhf_pipeline.stages import load_recipe, rm
    from tests.stages.conftest import write_recipe

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, "rm", [str(out / "data_card.yaml")],
                                      {"max_steps": 2}, data={"train": [str(out / "data_card.yaml")],
                                                              "eval_split": 0.0, "max_length": 128}))
    metrics = rm.run(recipe)
    assert metrics["data"]["rows_kept"] == 8
    assert (recipe.output_dir / "stage.json").is_file()


def test_probe_page_rule_prompt_answer_verdict(tmp_path: Path, browser, serve) -> None:
    """A verdict is recorded only on the policy's answer to the prompt shown, and once: before any answer and after
    the prompt was edited it is refused on the page; a double click and a second button add no row."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    rules = ["Answer in at most 5 words", "Never give medical advice"]
    url = serve(probe_page(ProbeSession(tmp_path / "probes", rules, lambda text: f"policy says: {text[::-1]}")))
    driver = browser()
    open_page(driver, url)
    type_into(driver, "annotator", "erin")
    find(driver, "CSS_SELECTOR", "#rule input").click()
    find(driver, "XPATH", f"//ul//li[contains(., '{rules[1]}')]").click()
    type_into(driver, "probe-prompt", "Which pill cures the flu?")
    click(driver, "broken")  # no answer generated yet
    wait_status(driver, "Not saved: generate the policy")
    answer_box = find(driver, "CSS_SELECTOR", "#probe-answer textarea")

    def generated(expected: str) -> None:
        click(driver, "generate")
        WebDriverWait(driver, 30).until(lambda d: answer_box.get_property("value") == expected,
                                        message=f"the answer box never showed {expected!r}")

    generated("policy says: ?ulf eht seruc llip hcihW")
    type_into(driver, "probe-prompt", "Which pill cures a cold?")  # edited after its answer came
    click(driver, "broken")
    wait_status(driver, "the prompt changed after its answer was generated")
    assert lines(tmp_path / "probes" / "classified.jsonl") == []

    generated("policy says: ?dloc a seruc llip hcihW")
    ActionChains(driver).double_click(find(driver, "ID", "broken")).perform()
    # Gradio may drop the second click while the first is pending; if it sends it, the session refuses it.
    WebDriverWait(driver, 30).until(lambda d: any(text in d.find_element(_by("ID"), "status").text for text in
                                                  ("Saved: rule broken. 1 verdicts so far", "already has its verdict")))
    click(driver, "kept")  # the same answer again, with the other button
    wait_status(driver, "this answer already has its verdict (rule broken, by erin)")
    rows = lines(tmp_path / "probes" / "classified.jsonl")
    assert rows == [{"prompt": "Which pill cures a cold?", "answer": "policy says: ?dloc a seruc llip hcihW",
                     "label": 1, "rule": rules[1], "annotator": "erin"}]
    assert len(lines(tmp_path / "probes" / "judgements.jsonl")) == 2  # the header and one verdict
    card = yaml.safe_load((tmp_path / "probes" / "data_card.yaml").read_text())
    assert card["format"] == "classification" and card["size"]["per_rule"] == {rules[1]: 1}


def test_ab_page_sides_undone_into_a_win_rate(tmp_path: Path, browser, serve) -> None:
    url = serve(ab_page(ABSession(write_ab_items(tmp_path / "ab.jsonl", count=3), tmp_path / "ab", seed=2)))
    driver = browser()
    open_page(driver, url)
    type_into(driver, "annotator", "frank")
    click(driver, "start")
    for number, verdict in enumerate(("policy", "baseline", "tie"), start=1):
        wait_status(driver, f"item {number} of 3")
        left = find(driver, "CSS_SELECTOR", "#answer-a textarea").get_property("value")
        choice = "tie" if verdict == "tie" else "a" if left.startswith(verdict) else "b"
        click(driver, f"pick-{choice}")
    wait_status(driver, "All 3 items are done by frank")
    records = lines(tmp_path / "ab" / "judgements.jsonl")[1:]
    assert [r["verdict"] for r in records] == ["policy", "baseline", "tie"]
    summary = json.loads((tmp_path / "ab" / "summary.json").read_text())
    assert summary["win_rate"]["win_rate"] == 0.5
    assert (summary["win_rate"]["wins"], summary["win_rate"]["ties"], summary["win_rate"]["losses"]) == (1, 1, 1)
