"""Sampling engines: Hugging Face `generate` (the default and the reference) and vLLM, colocated or as a server.

`generation.open_engine` builds the engine a recipe's `generation:` section asks for; every stage that samples
goes through it. See docs/vllm.md for the vLLM engine's install, modes and weight sync.
"""
