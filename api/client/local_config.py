"""Where client commands find the cluster: `heartcluster up` saves its URL and API key in its
data directory, and every client command reads them from there.

Precedence: a command-line option, then the environment (HEARTCLUSTER_URL,
HEARTCLUSTER_API_KEY), then the data directory's files (--data-dir, else HEARTCLUSTER_DATA_DIR,
else ./heartcluster-data), then the local default URL.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "HEARTCLUSTER_DATA_DIR"
URL_ENV = "HEARTCLUSTER_URL"
KEY_ENV = "HEARTCLUSTER_API_KEY"
DEFAULT_DATA_DIR = "heartcluster-data"
DEFAULT_URL = "http://127.0.0.1:8000"
URL_FILE = "url"  # under the data directory, while `up` runs
KEY_FILE = "api-key"  # under the data directory, owner-readable only


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR


def save_url(data_dir: Path, url: str) -> None:
    (data_dir / URL_FILE).write_text(url + "\n")


def forget_url(data_dir: Path, url: str) -> None:
    """Remove the saved URL if it is still `url` (another `up` may have replaced it)."""
    path = data_dir / URL_FILE
    if path.is_file() and path.read_text().strip() == url:
        path.unlink()


def gateway_url(option: str | None, data_dir: Path) -> str:
    saved = data_dir / URL_FILE
    from_file = saved.read_text().strip() if saved.is_file() else None
    return option or os.environ.get(URL_ENV) or from_file or DEFAULT_URL


def api_key(option: str | None, data_dir: Path) -> str | None:
    saved = data_dir / KEY_FILE
    from_file = saved.read_text().strip() if saved.is_file() else None
    return option or os.environ.get(KEY_ENV) or from_file or None
