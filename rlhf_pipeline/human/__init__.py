"""Human feedback: web pages where people label answers, judge two systems blind, and probe the policy.

    rlhf-pipeline annotate outputs/smollm2-135m/label/ranked.jsonl --out outputs/smollm2-135m/human-label
    rlhf-pipeline ab-eval outputs/smollm2-135m/eval --out outputs/smollm2-135m/human-ab
    rlhf-pipeline probe recipes/smollm2-135m/label.yaml --rule "At most 20 words" --out outputs/probes

The label stage samples K answers per prompt (and its machine judge ranks them); `annotate` shows each
prompt's answers to people instead, and writes the same preference pairs and data card the AI-feedback
path writes, so `rm` trains on either. Layout: store.py (the append-only judgement log), sessions.py
(what each page does), results.py (pairs, classified answers, cards, win rate), agreement.py (kappa),
pages.py (the Gradio pages), serve.py (host, port, URL). Gradio is imported only when a page starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rlhf_pipeline.human.serve import DEFAULT_HOST, DEFAULT_PORT, check_port


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for the judgement log and what it becomes (reopen with the same --out to resume)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")


def add_commands(subparsers: Any) -> None:
    """`annotate`, `ab-eval` and `probe`."""
    annotate = subparsers.add_parser(
        "annotate", help="human feedback: people pick the best of each prompt's sampled answers on a web page",
        description="Serve a labelling page for a label stage's ranked.jsonl (prompt + K answers per row): people "
                    "pick the best answer (shown in random order), flag answers that break a rule, or skip. Every "
                    "judgement is appended to --out/judgements.jsonl at once; preferences.jsonl + data_card.yaml "
                    "(for rm) and classified.jsonl + classification_card.yaml are rewritten after each one.",
        epilog="example: rlhf-pipeline annotate outputs/smollm2-135m/label/ranked.jsonl --out outputs/human-label")
    annotate.add_argument("items", type=Path, help="JSONL with prompt and answers per row (the label stage's "
                                                   "ranked.jsonl; its scores give the humans-vs-judge agreement)")
    annotate.add_argument("--rules", default="", help="the rules an answer may break, shown on the page")
    annotate.add_argument("--seed", type=int, default=0, help="seed of the shown answer orders")
    _add_server_arguments(annotate)
    annotate.set_defaults(handler=_annotate)
    ab = subparsers.add_parser(
        "ab-eval", help="blind A/B evaluation: people pick the better of two systems' answers",
        description="Serve a page showing the policy's and the baseline's answers to each prompt, sides randomised; "
                    "people pick A, B or tie. --out/summary.json holds the policy's win rate with its 95% interval.",
        epilog="example: rlhf-pipeline ab-eval outputs/smollm2-135m/eval --out outputs/human-ab")
    ab.add_argument("items", type=Path, help="an eval stage's folder (every prompt of its answers.jsonl), or a "
                                             "JSONL with prompt, policy and baseline per row")
    ab.add_argument("--policy", help="which of the eval stage's policies faces the baseline (when it has several)")
    ab.add_argument("--seed", type=int, default=0, help="seed of the sides")
    _add_server_arguments(ab)
    ab.set_defaults(handler=_ab_eval)
    probe = subparsers.add_parser(
        "probe", help="adversarial probing: people try to make the policy break a rule (Sparrow)",
        description="Serve a page where a person picks a rule, writes a prompt, sees the policy's answer generated "
                    "live and marks the rule broken or kept; --out holds classified.jsonl + a classification card.",
        epilog='example: rlhf-pipeline probe recipes/smollm2-135m/label.yaml --rule "Answer in at most 20 words" '
               "--out outputs/probes")
    probe.add_argument("recipe", help="a label recipe: its model is the policy, its labelling section the sampling")
    probe.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="overrides of the recipe, e.g. labelling.temperature=0.7")
    probe.add_argument("--rule", action="append", default=[], required=True, help="a rule to probe (repeatable)")
    _add_server_arguments(probe)
    probe.set_defaults(handler=_probe)


def _annotate(args: argparse.Namespace) -> int:
    from rlhf_pipeline.human.pages import label_page, require_gradio
    from rlhf_pipeline.human.sessions import LabelSession

    require_gradio()
    check_port(args.host, args.port)
    session = LabelSession(args.items, args.out, args.seed, args.rules)
    print(f"annotate: {len(session.items)} items, {len(session.log.records)} judgements already in "
          f"{session.log.path}")
    return _serve(label_page(session), args, session.log.path)


def _ab_eval(args: argparse.Namespace) -> int:
    from rlhf_pipeline.human.pages import ab_page, require_gradio
    from rlhf_pipeline.human.sessions import ABSession

    require_gradio()
    check_port(args.host, args.port)
    session = ABSession(args.items, args.out, args.seed, args.policy)
    print(f"ab-eval: {len(session.items)} prompts, {len(session.log.records)} verdicts already in {session.log.path}")
    return _serve(ab_page(session), args, session.log.path)


def _probe(args: argparse.Namespace) -> int:
    from rlhf_pipeline.human.pages import probe_page, require_gradio
    from rlhf_pipeline.human.policy import policy_generator
    from rlhf_pipeline.human.sessions import ProbeSession

    require_gradio()
    check_port(args.host, args.port)
    session = ProbeSession(args.out, args.rule, policy_generator(args.recipe, args.overrides))
    return _serve(probe_page(session), args, session.log.path)


def _serve(page: Any, args: argparse.Namespace, log: Path) -> int:
    """Run the page until Ctrl-C; if the server dies, say so and where the saved judgements are."""
    from rlhf_pipeline.human.serve import launch

    try:
        launch(page, args.host, args.port)
    except Exception as err:
        print(f"error: the page stopped ({type(err).__name__}: {err}); every judgement made so far is saved in "
              f"{log}: run the same command to resume", flush=True)
        return 1
    print(f"stopped; the judgements are in {log}")
    return 0
