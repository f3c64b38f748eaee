"""A Celery app built only from shared.core.queueing (no tasks), for workers that just consume.

Tests start `celery -A tests.support.probe_celery_app worker -Q cpu` to see readiness checks
notice a consumer without loading any model code.
"""

from shared.core.config import Settings
from shared.core.queueing import make_celery

app = make_celery(Settings.from_env())
