"""Tasks with answers a program can check: what "verifiable rewards" and accuracy are measured on.

`answers` reads the final answer of a solution (ours: "The answer is N."; GSM8K's: "#### N") and holds the
outcome check, `outcome`, a reward function for any card whose prompts carry their right answer (a
`reference` column); `arithmetic` generates the shipped multi-step word problems and verifies each step.
"""
