"""Serving side: prompt format, queue protocol, generation engine.

Kept import-light: `from inference.prompt_format import render_prompt` or `from inference.protocol import ...`
never pulls torch into a bot. Heavy modules (`inference.engine`) import torch themselves.
"""

import logging


class _NoHubKernelNoise(logging.Filter):
    """Drop bitsandbytes' warning that it could not fetch optional CPU kernels from the HF hub.

    bitsandbytes' CPU backend tries `kernels.get_kernel("kernels-community/...")` when it is imported (by peft or
    transformers, QLoRA or not) and logs a warning when that fails, which it always does offline; it then uses
    its own kernels. Everything else from that logger still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelNoise())
