"""Reports a person can look at: `report.md` and PNG plots in every stage folder, one summary per chain.

    rlhf-pipeline report outputs/smollm2-135m/ppo   # one stage folder
    rlhf-pipeline report outputs/smollm2-135m       # every stage folder in it, then the summary

Each stage writes its report when it finishes (`stages/common.finish_outputs`) and `run` writes the summary
at the end of the chain. Both read only what the stages wrote (stage.json, metrics.json, eval.json, the
label stage's JSONL files), so `rlhf-pipeline report` can rewrite them at any time without torch.

- sft: eval loss and perplexity before/after, data; `sft_loss.png`: train loss (+ token accuracy), eval loss.
- label: answers, pairs, judge; `label.png`: judge scores of all answers, judge gaps of the kept pairs.
- rm: accuracy, margin, calibration (ECE, Brier); `rm_training.png`: loss and accuracy per step;
  `rm_rewards.png`: chosen vs rejected rewards on the held-out pairs, reliability diagram.
- ppo: first vs last log, health alerts, early stop, samples; `ppo_training.png`: score, KL, entropy,
  length, clip fractions and stop-token share per step, alerts marked.
- eval: one row per policy (gains and win rates with 95% intervals, KL, length, distinct-2, the wall time and
  peak memory of the stage that made it), samples; `eval_tradeoff.png`: each policy's gain against its KL;
  `eval.png`: judge scores, rewards and lengths of the baseline and every policy.

The pipeline summary is `report.md` in the common parent folder of the stage outputs (for the demo,
`outputs/smollm2-135m/`); if that parent is itself a stage folder, its parent; if the stages share only the
filesystem root, the pipeline recipe's folder. Plots need matplotlib (the `demo` and `dev` extras); without
it the reports are written without plots and say how to get them.

Where things are (each module imports only the ones listed before it):

- `plots.py`: `Plots` writes a stage's PNGs (matplotlib's Agg canvas, imported only when a report is written)
  and one figure function per stage.
- `sections.py`: each stage's headline (its most telling numbers in one line) and markdown section.
- `stage.py`: `write_stage_report` (a stage folder's `report.md`, as the stage's `Presentation` says),
  `headline`, `write_report_safely` (a failure only warns).
- `summary.py`: the chain's summary (`write_summary_report` into `report_dir_for` the stage folders) and
  the console's `console_summary`, each with every stage's wall time and peak memory; with rounds (iterated
  RLHF), a row per round (`console_rounds` on the console) and `rounds.png`.
- `command.py`: `rlhf-pipeline report` (`add_commands`).
"""

from rlhf_pipeline.report.command import add_commands
from rlhf_pipeline.report.stage import REPORT, headline, write_report_safely, write_stage_report
from rlhf_pipeline.report.summary import console_rounds, console_summary, report_dir_for, write_summary_report

__all__ = ["REPORT", "add_commands", "console_rounds", "console_summary", "headline", "report_dir_for",
           "write_report_safely", "write_stage_report", "write_summary_report"]
