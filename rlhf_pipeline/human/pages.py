"""The three Gradio pages: labelling (best of K, flags, skip), blind A/B evaluation, and adversarial probing.

Wiring only: each button calls a session method (sessions.py) and shows the `View` it returns. Elements
carry stable ids (`elem_id`) so the browser tests, and anyone scripting the page, can find them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from rlhf_pipeline.human.sessions import ABSession, LabelSession, ProbeSession, View

_HELP = {
    "label": "Read the prompt and the answers (their order is random), pick the best one, and tick any answer that "
             "breaks a rule{rules}. Every judgement is saved the moment you press Submit; close the tab whenever "
             "you like, and come back with the same name to continue where you stopped.",
    "ab": "Two answers to the same prompt, from two systems, in a random order: pick the better one, or Tie. "
          "Each verdict is saved at once; come back with the same name to continue.",
    "probe": "Pick a rule, write a prompt meant to make the policy break it, generate the answer, and say whether "
             "the rule was broken. Each answer takes one verdict, saved at once; after editing the prompt, generate "
             "its answer again before judging.",
}


def require_gradio() -> Any:
    """Gradio, or the one line saying how to install it (it is an optional extra)."""
    try:
        import gradio
    except ImportError as err:
        from rlhf_pipeline.errors import PipelineError

        raise PipelineError("the human-feedback pages need gradio: pip install 'rlhf-pipeline[human]'") from err
    return gradio


def _blocks(title: str) -> gr.Blocks:
    return require_gradio().Blocks(title=title, analytics_enabled=False)


def _choice_names(count: int) -> list[str]:
    return [f"Answer {i + 1}" for i in range(count)]


def label_page(session: LabelSession) -> gr.Blocks:
    """Prompt, K answer boxes, a best-answer radio, rule-break checkboxes, Submit and Skip."""
    gr = require_gradio()
    slots = session.max_answers
    rules = f" ({session.rules})" if session.rules else ""
    with _blocks("Label answers") as page:
        gr.Markdown(f"## Which answer is best?\n{_HELP['label'].format(rules=rules)}")
        with gr.Row():
            name = gr.Textbox(label="Your name", elem_id="annotator", scale=3)
            start = gr.Button("Start / resume", elem_id="start", scale=1)
        status = gr.Markdown(elem_id="status")
        prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="prompt", visible=False)
        boxes = [gr.Textbox(label=label, interactive=False, elem_id=f"answer-{i}", visible=False)
                 for i, label in enumerate(_choice_names(slots))]
        best = gr.Radio(_choice_names(slots), type="index", label="Best answer", elem_id="best", visible=False)
        flags = gr.CheckboxGroup(_choice_names(slots), type="index", label="Breaks a rule", elem_id="flags",
                                 visible=False)
        with gr.Row():
            submit = gr.Button("Submit", variant="primary", elem_id="submit")
            skip = gr.Button("Skip", elem_id="skip")
        state = gr.State(None)
        outputs = [status, prompt, *boxes, best, flags, state]

        def show(view: View) -> list[Any]:
            shown = view.state is not None
            count = len(view.answers)
            return [view.status, gr.update(value=view.prompt, visible=shown),
                    *(gr.update(value=view.answers[i] if i < count else "", visible=shown and i < count)
                      for i in range(slots)),
                    gr.update(choices=_choice_names(count) if shown else [], value=None, visible=shown),
                    gr.update(choices=_choice_names(count) if shown else [], value=[], visible=shown),
                    view.state]

        start.click(lambda n: show(session.open(n)), [name], outputs)
        name.submit(lambda n: show(session.open(n)), [name], outputs)
        submit.click(lambda n, s, b, f: show(session.judge(n, s, b, f or [])), [name, state, best, flags], outputs)
        skip.click(lambda n, s: show(session.skip(n, s)), [name, state], outputs)
    return page


def ab_page(session: ABSession) -> gr.Blocks:
    """Prompt, answers A and B side by side, and A / B / Tie / Skip buttons."""
    gr = require_gradio()

    with _blocks("Blind A/B evaluation") as page:
        gr.Markdown(f"## Which answer is better?\n{_HELP['ab']}")
        with gr.Row():
            name = gr.Textbox(label="Your name", elem_id="annotator", scale=3)
            start = gr.Button("Start / resume", elem_id="start", scale=1)
        status = gr.Markdown(elem_id="status")
        prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="prompt")
        with gr.Row():
            boxes = [gr.Textbox(label=f"Answer {side}", interactive=False, elem_id=f"answer-{side.lower()}")
                     for side in "AB"]
        with gr.Row():
            buttons = {choice: gr.Button(label, elem_id=f"pick-{choice.lower()}")
                       for choice, label in (("A", "A is better"), ("B", "B is better"), ("tie", "Tie"),
                                             ("skip", "Skip"))}
        state = gr.State(None)
        outputs = [status, prompt, *boxes, state]

        def show(view: View) -> list[Any]:
            answers = view.answers or ["", ""]
            return [view.status, view.prompt, *answers, view.state]

        start.click(lambda n: show(session.open(n)), [name], outputs)
        name.submit(lambda n: show(session.open(n)), [name], outputs)
        for choice, button in buttons.items():
            button.click(lambda n, s, c=choice: show(session.judge(n, s, c)), [name, state], outputs)
    return page


def probe_page(session: ProbeSession) -> gr.Blocks:
    """Rule picker, prompt box, Generate, the policy's answer, and Broken / Kept buttons."""
    gr = require_gradio()

    with _blocks("Probe the policy") as page:
        gr.Markdown(f"## Can you make the policy break a rule?\n{_HELP['probe']}")
        name = gr.Textbox(label="Your name", elem_id="annotator")
        rule = gr.Dropdown(session.rules, value=session.rules[0], label="Rule", elem_id="rule")
        prompt = gr.Textbox(label="Your prompt", lines=2, elem_id="probe-prompt")
        generate = gr.Button("Generate the policy's answer", elem_id="generate")
        answer = gr.Textbox(label="The policy's answer", interactive=False, elem_id="probe-answer")
        with gr.Row():
            broken = gr.Button("Rule broken", variant="stop", elem_id="broken")
            kept = gr.Button("Rule kept", elem_id="kept")
        status = gr.Markdown(elem_id="status")
        state = gr.State(None)  # the answer shown: its prompt and id (sessions.ProbeSession.answer)

        def answer_of(text: str) -> tuple[str, str, dict[str, Any] | None]:
            view = session.answer(text)
            return (view.answers[0] if view.answers else ""), view.status, view.state

        generate.click(answer_of, [prompt], [answer, status, state])
        broken.click(lambda n, r, p, s: session.verdict(n, r, p, s, True), [name, rule, prompt, state], [status])
        kept.click(lambda n, r, p, s: session.verdict(n, r, p, s, False), [name, rule, prompt, state], [status])
    return page
