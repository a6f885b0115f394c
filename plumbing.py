"""
Whether the Hugging Face Hub can be reached: gpt.py and prepare.py ask before they use it.

(What else was here, the parts of training and sampling that are not the lesson, now lives in
devices.py, checkpoints.py, runlog.py and stop_signals.py.)
"""

import os
import socket
import urllib.parse


def hub_unreachable() -> bool:
    """True when not even a connection to the Hugging Face Hub opens. datasets and transformers
    would then retry for half a minute before failing; in offline mode they fail at once, or
    read a copy in their cache. Not checked when offline mode or a proxy is set already: those
    decide for themselves. (prepare.py's --hf_dataset and gpt.py's GPT-2 weights ask.)"""
    if any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY",
                                       "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return True
    return False
