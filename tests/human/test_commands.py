"""The commands: a busy port, a foreign output file and a dying server each get one clear line, and nothing
judged is lost; without gradio, one line saying how to install it; the label stage's own output is what
`annotate` reads; `probe` answers live with the policy."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.human.sessions import LabelSession
from rlhf_pipeline.human.store import LOG_NAME
from tests.human.items import write_items
from tests.stages.conftest import write_card


def test_a_port_in_use_is_named_with_the_fix_before_anything_is_written(tmp_path: Path, capsys) -> None:
    pytest.importorskip("gradio")
    items = write_items(tmp_path / "ranked.jsonl")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["annotate", str(items), "--out", str(tmp_path / "human"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: port {port} on 127.0.0.1 is in use" in err and f"--port {port + 1}" in err
    assert not (tmp_path / "human").exists()


def test_a_foreign_output_file_is_refused_and_left_alone(tmp_path: Path, capsys) -> None:
    pytest.importorskip("gradio")
    items = write_items(tmp_path / "ranked.jsonl")
    (tmp_path / "human").mkdir()
    (tmp_path / "human" / LOG_NAME).write_text("my own notes\n")
    assert main(["annotate", str(items), "--out", str(tmp_path / "human"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'human' / LOG_NAME}: not a judgement log of rlhf-pipeline" in err
    assert "choose another --out folder" in err
    assert (tmp_path / "human" / LOG_NAME).read_text() == "my own notes\n"


def test_without_gradio_one_line_says_how_to_install_it(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    items = write_items(tmp_path / "ranked.jsonl")
    assert main(["annotate", str(items), "--out", str(tmp_path / "human"), "--port", "0"]) == 2
    assert "the human-feedback pages need gradio: pip install 'rlhf-pipeline[human]'" in capsys.readouterr().err
    assert not (tmp_path / "human").exists()


def test_a_dying_server_says_where_the_saved_judgements_are(tmp_path: Path, capsys, monkeypatch) -> None:
    pytest.importorskip("gradio")
    items, out = write_items(tmp_path / "ranked.jsonl"), tmp_path / "human"
    session = LabelSession(items, out)
    view = session.open("alice")
    session.judge("alice", view.state, 0, [])

    def crash(*args, **kwargs):
        raise RuntimeError("uvicorn died")

    monkeypatch.setattr("rlhf_pipeline.human.serve.launch", crash)
    assert main(["annotate", str(items), "--out", str(out), "--port", "0"]) == 1
    said = capsys.readouterr().out
    assert "annotate: 4 items, 1 judgements already in" in said
    assert f"error: the page stopped (RuntimeError: uvicorn died); every judgement made so far is saved in " \
           f"{out / LOG_NAME}: run the same command to resume" in said
    assert LabelSession(items, out).open("alice").state["item"] == 1


def test_the_label_stage_output_is_annotated_and_probe_answers_live(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rlhf_pipeline.human.policy import policy_generator

    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(3)], "prompt_only",
               ["label"])
    recipe = tmp_path / "label.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "label", "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
        "judge": {"type": "vader"},
        "labelling": {"output_dir": str(tmp_path / "label"), "num_samples": 3, "max_new_tokens": 8}}))
    assert main(["label", str(recipe)]) == 0
    session = LabelSession(tmp_path / "label" / "ranked.jsonl", tmp_path / "human")
    view = session.open("alice")
    assert len(view.answers) == 3 and view.prompt == "Tell me about topic 0."
    session.judge("alice", view.state, 0, [])
    judged = json.loads((tmp_path / "human" / "summary.json").read_text())
    assert judged["agreement"]["humans_vs_judge"]["alice"]["items"] == 1  # the stage's scores are the judge's pick

    generate = policy_generator(str(recipe))
    first = generate("Tell me about cake.")
    assert isinstance(first, str) and first == generate("Tell me about cake.")  # the label stage's seeded sampling
    write_card(tmp_path, "pairs", [{"prompt": "a", "chosen": "b", "rejected": "c"}], "prompt_chosen_rejected", ["rm"])
    rm_recipe = tmp_path / "rm.yaml"
    rm_recipe.write_text(yaml.safe_dump({"stage": "rm", "model": {"name_or_path": str(tiny_model_dir)},
                                         "data": {"train": ["pairs"]},
                                         "training": {"output_dir": str(tmp_path / "rm")}}))
    with pytest.raises(PipelineError, match="a label recipe is needed"):
        policy_generator(str(rm_recipe))
