"""Every user error of the `heartcluster` command as one line on stderr, never a traceback:
a missing file, a bad or unreachable gateway URL, an error answer, a cluster that cannot start,
a bad HEARTCLUSTER_* setting, a failed download."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import redis
import requests

from api.client.client import ApiError
from api.client.launcher import LaunchError
from api.client.models_download import DownloadError
from shared.core.config import SettingsError

Handler = Callable[[argparse.Namespace], int]
INTERRUPTED = 130  # the shell's status for Ctrl-C


class UsageError(Exception):
    """The command line asks for something impossible; the message says what and how to fix."""


def run_reporting_errors(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command; a user error prints `error: ...` and exits 1."""
    try:
        return handler(args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except (UsageError, ApiError, LaunchError, SettingsError, DownloadError) as error:
        message = str(error)
    except requests.exceptions.InvalidURL as error:
        message = f"bad URL: {error}"
    except requests.ConnectionError:
        url = getattr(args, "url", None)
        message = f"no gateway answers at {url} (is `heartcluster up` running?)"
    except requests.Timeout:
        message = f"the gateway at {getattr(args, 'url', None)} did not answer in time"
    except redis.RedisError as error:
        message = f"Redis: {error} (is HEARTCLUSTER_REDIS_URL right?)"
    except OSError as error:  # a missing or unreadable file
        if error.filename is None:
            raise
        message = f"{error.strerror}: {error.filename}"
    print(f"error: {message}", file=sys.stderr)
    return 1
