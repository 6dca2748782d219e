"""Serving side: prompt format, queue protocol, generation engine.

Kept import-light: `from inference.prompt_format import render_prompt` or `from inference.protocol import ...`
never pulls torch into a bot. Heavy modules (`inference.engine`) import torch themselves.
"""
