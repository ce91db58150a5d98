"""Serving a page: localhost by default, the port checked before Gradio starts, one clear line with the URL.

The page needs no internet: Gradio's own bundled frontend and fonts, no share link, no telemetry, no
server-side rendering (which would need node).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING

from rlhf_pipeline.errors import PipelineError

if TYPE_CHECKING:
    import gradio as gr

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def check_port(host: str, port: int) -> None:
    """Fail with the fix when the port is taken (another page still open?) or the host is not ours.

    SO_REUSEADDR, as the server itself binds: connections of a page just stopped linger in TIME_WAIT for a
    minute, and reopening the page on its port (to resume) must not be refused for them.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PipelineError(f"port {port} on {host} is in use (another page still running?); stop it or "
                                    f"pass --port with a free port, e.g. --port {port + 1}") from err
            raise PipelineError(f"cannot listen on {host}:{port} ({err.strerror}); pass --host with an address of "
                                f"this machine (default {DEFAULT_HOST}) or another --port") from err


def url_of(host: str, port: int) -> str:
    shown = "localhost" if host in ("127.0.0.1", "localhost") else host
    return f"http://{shown}:{port}/"


def launch(page: gr.Blocks, host: str, port: int, block: bool = True) -> str:
    """Start the page (blocking until Ctrl-C unless `block` is False) and return its URL."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_port(host, port)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, share=False, quiet=True, ssr_mode=False, footer_links=[],
                prevent_thread_lock=True)
    url = url_of(host, port)
    print(f"open {url} in a browser (Ctrl-C here stops the page; every judgement is already saved)", flush=True)
    if block:
        page.block_thread()
    return url
