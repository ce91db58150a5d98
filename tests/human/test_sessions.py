"""The labelling, A/B and probing logic without a browser: the log, resume, undoing the shown order, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.human.agreement import cohen_kappa, fleiss_kappa
from rlhf_pipeline.human.sessions import (
    NO_ANSWER,
    NO_NAME,
    PROMPT_CHANGED,
    ABSession,
    LabelSession,
    ProbeSession,
)
from rlhf_pipeline.human.store import LOG_NAME
from tests.human.items import answer, write_ab_items, write_items


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cohen_kappa_matches_the_textbook_example() -> None:
    # 50 items: both yes 20, A yes B no 5, A no B yes 10, both no 15 -> p_o 0.7, p_e 0.5, kappa 0.4
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # chance agreement is 1: kappa undefined


def test_fleiss_kappa_matches_the_textbook_example() -> None:
    # Fleiss (1971) as on Wikipedia: 10 items, 14 raters, 5 categories -> kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    ratings = [[category for category, count in enumerate(row) for _ in range(count)] for row in table]
    assert fleiss_kappa(ratings) == pytest.approx(0.210, abs=5e-4)


def test_label_judgements_undo_the_shown_order_and_resume(tmp_path: Path) -> None:
    items = write_items(tmp_path / "ranked.jsonl")
    out = tmp_path / "human"
    session = LabelSession(items, out, seed=3, rules="no insults")
    view = session.open("alice")
    assert view.state["item"] == 0 and sorted(view.answers) == sorted(answer(0, j) for j in range(3))
    shown_best = view.answers.index(answer(0, 2))
    shown_flag = view.answers.index(answer(0, 0))
    view = session.judge("alice", view.state, shown_best, [shown_flag])
    assert view.state["item"] == 1 and view.status.startswith("Saved.")
    session.skip("alice", view.state)

    reopened = LabelSession(items, out, seed=3, rules="no insults")  # a closed tab or a crash: the log is all
    assert reopened.open("alice").state["item"] == 2
    assert reopened.open("bob").state["item"] == 0
    records = lines(out / LOG_NAME)[1:]
    assert [(r["item"], r["verdict"], r["best"], r["flags"]) for r in records] == [(0, "best", 2, [0]),
                                                                                  (1, "skip", None, [])]
    pairs = lines(out / "preferences.jsonl")
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {(answer(0, 2), answer(0, 0)), (answer(0, 2), answer(0, 1))}
    classified = {row["answer"]: row["label"] for row in lines(out / "classified.jsonl")}
    assert classified == {answer(0, 0): 1, answer(0, 1): 0, answer(0, 2): 0}
    card = yaml.safe_load((out / "data_card.yaml").read_text())
    assert card["format"] == "prompt_chosen_rejected" and card["size"]["rows"] == 2
    assert card["size"]["per_annotator"] == {"alice": 2}
    flags_card = yaml.safe_load((out / "classification_card.yaml").read_text())
    assert flags_card["format"] == "classification" and flags_card["violation_when"] is True
    assert "no insults" in flags_card["description"]


def test_agreement_between_annotators_and_with_the_judge(tmp_path: Path) -> None:
    items = write_items(tmp_path / "ranked.jsonl", count=2)
    session = LabelSession(items, tmp_path / "human")
    for name, picks in (("alice", [2, 0]), ("bob", [2, 1])):
        for original in picks:
            view = session.open(name)
            session.judge(name, view.state, view.state["order"].index(original), [])
    summary = json.loads((tmp_path / "human" / "summary.json").read_text())
    assert summary["agreement"]["annotators"]["pairs"]["alice vs bob"]["agreement"] == 0.5
    # the judge prefers answer 2 everywhere: alice agrees on item 0 only, like bob
    assert summary["agreement"]["humans_vs_judge"]["alice"]["agreement"] == 0.5
    card = yaml.safe_load((tmp_path / "human" / "data_card.yaml").read_text())
    assert "alice vs bob" in card["description"] and "machine judge" in card["description"]


def test_every_annotator_is_compared_with_the_judge_whatever_their_name(tmp_path: Path) -> None:
    # "mike" and "zoe" sort after "judge": a pair looked up as "<name> vs judge" in a sorted report missed both.
    items = write_items(tmp_path / "ranked.jsonl", count=4, judge_picks=[2, 0, 1, 2])
    session = LabelSession(items, tmp_path / "human")
    for name, picks in (("mike", [2, 0, 0, 1]), ("zoe", [2, 1, 1])):
        for original in picks:
            view = session.open(name)
            session.judge(name, view.state, view.state["order"].index(original), [])
    agreement = json.loads((tmp_path / "human" / "summary.json").read_text())["agreement"]
    versus_judge = agreement["humans_vs_judge"]
    assert set(versus_judge) == {"mike", "zoe"}
    # mike [2 0 0 1] vs judge [2 0 1 2]: p_o 2/4; his picks 2:1 0:2 1:1, the judge's 2:2 0:1 1:1 ->
    # p_e (1·2 + 2·1 + 1·1)/16 = 5/16; kappa (1/2 − 5/16)/(1 − 5/16) = 3/11.
    assert versus_judge["mike"] == {"items": 4, "agreement": 0.5, "cohen_kappa": pytest.approx(3 / 11)}
    # zoe [2 1 1] vs judge [2 0 1] on her 3 items: p_o 2/3; p_e (1·1 + 2·1)/9 = 1/3; kappa (2/3 − 1/3)/(2/3) = 1/2.
    assert versus_judge["zoe"] == {"items": 3, "agreement": pytest.approx(2 / 3), "cohen_kappa": pytest.approx(0.5)}
    # mike [2 0 0] vs zoe [2 1 1]: p_o 1/3; p_e 1/9; kappa (1/3 − 1/9)/(8/9) = 1/4.
    assert agreement["annotators"]["pairs"] == {"mike vs zoe": {"items": 3, "agreement": pytest.approx(1 / 3),
                                                                "cohen_kappa": pytest.approx(0.25)}}
    card = yaml.safe_load((tmp_path / "human" / "data_card.yaml").read_text())
    assert "mike vs the machine judge 0.27 on 4 items" in card["description"]
    assert "zoe vs the machine judge 0.50 on 3 items" in card["description"]


def test_empty_name_records_nothing(tmp_path: Path) -> None:
    session = LabelSession(write_items(tmp_path / "ranked.jsonl"), tmp_path / "human")
    state = session.open("alice").state
    assert session.open("  ").status == NO_NAME
    assert session.judge("", state, 0, []).status == NO_NAME
    assert session.judge("alice", state, None, []).status == "Pick the best answer (or press Skip)."
    assert session.log.records == []


def test_a_foreign_output_file_is_refused(tmp_path: Path) -> None:
    items = write_items(tmp_path / "ranked.jsonl")
    (tmp_path / "human").mkdir()
    (tmp_path / "human" / LOG_NAME).write_text('{"chosen": "mine"}\n')
    with pytest.raises(PipelineError, match="not a judgement log of rlhf-pipeline"):
        LabelSession(items, tmp_path / "human")
    assert (tmp_path / "human" / LOG_NAME).read_text() == '{"chosen": "mine"}\n'
    LabelSession(items, tmp_path / "other")
    write_items(items, count=5)  # the items changed under the log: the judgements would point at other answers
    with pytest.raises(PipelineError, match="choose another --out folder for these items"):
        LabelSession(items, tmp_path / "other")


def test_a_torn_last_line_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    items = write_items(tmp_path / "ranked.jsonl")
    session = LabelSession(items, tmp_path / "human")
    view = session.open("alice")
    session.judge("alice", view.state, 0, [])
    with (tmp_path / "human" / LOG_NAME).open("a") as log:
        log.write('{"item": 1, "annot')  # the process died mid-write
    reopened = LabelSession(items, tmp_path / "human")
    assert reopened.log.torn_lines == 1 and len(reopened.log.records) == 1
    assert reopened.open("alice").state["item"] == 1
    assert len(lines(tmp_path / "human" / LOG_NAME)) == 2


def test_ab_verdicts_become_a_win_rate_with_its_interval(tmp_path: Path) -> None:
    session = ABSession(write_ab_items(tmp_path / "ab.jsonl", count=4), tmp_path / "ab", seed=1)
    lefts = []
    for preferred in ("policy", "policy", "policy", "baseline"):
        view = session.open("carol")
        left_is_policy = view.answers[0].startswith("policy")
        lefts.append(left_is_policy)
        session.judge("carol", view.state, "A" if left_is_policy == (preferred == "policy") else "B")
    assert len(set(lefts)) == 2  # both sides were used: the test really undoes the randomisation
    summary = json.loads((tmp_path / "ab" / "summary.json").read_text())
    assert summary["win_rate"]["win_rate"] == 0.75
    assert (summary["win_rate"]["wins"], summary["win_rate"]["losses"]) == (3, 1)
    assert summary["win_rate"]["win_rate_ci95_low"] <= 0.75 <= summary["win_rate"]["win_rate_ci95_high"]


def test_ab_items_come_from_an_eval_stage_one_policy_per_log(tmp_path: Path) -> None:
    examples = [{"prompt": f"Q{i}?", "baseline": f"base {i}", "policies": {"ppo": f"ppo {i}", "dpo": f"dpo {i}"}}
                for i in range(3)]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps({"examples": examples}))
    with pytest.raises(PipelineError, match="choose the policy to compare with --policy: one of dpo, ppo"):
        ABSession(tmp_path / "eval", tmp_path / "ab")
    session = ABSession(tmp_path / "eval", tmp_path / "ab", policy="dpo")
    assert sorted(session.open("gus").answers) == ["base 0", "dpo 0"]
    assert json.loads((tmp_path / "ab" / "summary.json").read_text())["policy"] == "dpo"
    with pytest.raises(PipelineError, match="holds 'ab:dpo' judgements"):
        ABSession(tmp_path / "eval", tmp_path / "ab", policy="ppo")


def test_ab_items_are_every_prompt_of_an_eval_stages_answers_file(tmp_path: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "baseline": {"answer": f"base {i}", "judge": 0.1},
             "policies": {"ppo": {"answer": f"ppo {i}", "kl": 0.2}, "dpo": {"answer": f"dpo {i}", "kl": 0.3}}}
            for i in range(9)]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps({"examples": []}))  # it keeps a few examples at most
    (tmp_path / "eval" / "answers.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    session = ABSession(tmp_path / "eval", tmp_path / "ab", policy="dpo")
    assert [(item["policy"], item["baseline"]) for item in session.items] == [(f"dpo {i}", f"base {i}")
                                                                              for i in range(9)]
    view = session.open("gus")
    assert view.prompt == "Q0?" and sorted(view.answers) == ["base 0", "dpo 0"]
    assert session.log.header["items"] == str((tmp_path / "eval" / "answers.jsonl").resolve())


def test_probe_verdicts_become_classification_data(tmp_path: Path) -> None:
    session = ProbeSession(tmp_path / "probes", ["At most 5 words"], lambda text: f"echo {text}")
    view = session.answer("Say a lot")
    assert view.answers == ["echo Say a lot"] and view.state["prompt"] == "Say a lot"
    assert session.verdict("dan", "At most 5 words", "Say a lot", view.state, True).startswith("Saved")
    rows = lines(tmp_path / "probes" / "classified.jsonl")
    assert rows == [{"prompt": "Say a lot", "answer": "echo Say a lot", "label": 1, "rule": "At most 5 words",
                     "annotator": "dan"}]
    card = yaml.safe_load((tmp_path / "probes" / "data_card.yaml").read_text())
    assert card["format"] == "classification" and card["size"]["per_rule"] == {"At most 5 words": 1}


def test_a_probe_verdict_needs_the_policys_answer_to_the_prompt_shown(tmp_path: Path) -> None:
    asked: list[str] = []

    def generate(text: str) -> str:
        asked.append(text)
        return f"answer {len(asked)} to {text}"

    rule = "At most 5 words"
    session = ProbeSession(tmp_path / "probes", [rule], generate)
    assert session.answer("   ").status == "Write a prompt first." and session.answer("  ").state is None
    assert asked == []  # nothing was generated for an empty prompt
    assert session.verdict("dan", rule, "Say a lot", None, True) == NO_ANSWER
    first = session.answer("Say a lot").state
    # The prompt box was edited after the answer came: the answer shown is not the policy's answer to it.
    assert session.verdict("dan", rule, "Say a little", first, True) == PROMPT_CHANGED
    assert session.verdict("dan", "Some other rule", "Say a lot", first, True).startswith("Pick one of the rules")
    assert session.log.records == [] and lines(tmp_path / "probes" / "classified.jsonl") == []

    second = session.answer("Say a little").state  # a fresh answer for the edited prompt
    assert session.verdict("dan", rule, "Say a little", second, False).startswith("Saved: rule kept. 1 verdicts")
    rows = lines(tmp_path / "probes" / "classified.jsonl")
    assert [(r["prompt"], r["answer"], r["label"]) for r in rows] == [("Say a little", "answer 2 to Say a little", 0)]


def test_a_repeated_probe_verdict_adds_no_row(tmp_path: Path) -> None:
    rule = "At most 5 words"
    session = ProbeSession(tmp_path / "probes", [rule], lambda text: f"echo {text}")
    state = session.answer("Say a lot").state
    assert session.verdict("dan", rule, "Say a lot", state, True).startswith("Saved: rule broken. 1 verdicts")
    for broken in (True, False):  # a double click, then the other button: the same answer, judged once
        assert session.verdict("dan", rule, "Say a lot", state, broken) == (
            "Not saved: this answer already has its verdict (rule broken, by dan). Press Generate, or write a new "
            "prompt, to judge another answer.")
    assert len(lines(tmp_path / "probes" / "classified.jsonl")) == 1 and len(session.log.records) == 1
    again = session.answer("Say a lot").state  # the same prompt asked again is another answer, judged on its own
    assert again["answer_id"] != state["answer_id"]
    assert session.verdict("dan", rule, "Say a lot", again, False).startswith("Saved: rule kept. 2 verdicts")


def test_a_failed_write_says_so_and_keeps_the_item(tmp_path: Path, monkeypatch) -> None:
    session = LabelSession(write_items(tmp_path / "ranked.jsonl"), tmp_path / "human")
    view = session.open("alice")

    def disk_full(record: dict) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(session.log, "_write_line", disk_full)
    failed = session.judge("alice", view.state, 0, [])
    assert failed.status.startswith("Could not save this judgement ([Errno 28] No space left on device)")
    assert failed.state == view.state and session.log.records == []
