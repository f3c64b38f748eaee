"""Standard Webhooks signing, the target check and the Redis outbox (real redis-server)."""

from __future__ import annotations

import pytest

from shared.core.config import Settings, SettingsError
from shared.core.webhooks import (
    DUE_KEY,
    TargetRefused,
    WebhookStore,
    backoff_s,
    check_target,
    sign,
    signed_headers,
    verify,
)

# The Standard Webhooks specification's published test vector.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID, SPEC_TS, SPEC_BODY = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'


def test_signature_matches_the_specification_vector() -> None:
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == expected
    headers = signed_headers([SPEC_SECRET], SPEC_ID, SPEC_BODY, SPEC_TS)
    assert headers["webhook-signature"] == expected
    assert verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 10)


def test_verification_refuses_tampering_and_stale_timestamps() -> None:
    headers = signed_headers([SPEC_SECRET], SPEC_ID, SPEC_BODY, SPEC_TS)
    assert not verify(SPEC_SECRET, headers, b'{"test": 2432232315}', now=SPEC_TS)
    assert not verify(SPEC_SECRET, {**headers, "webhook-id": "msg_other"}, SPEC_BODY, SPEC_TS)
    assert not verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 3600)
    other = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"
    assert not verify(other, headers, SPEC_BODY, now=SPEC_TS)


def test_a_rotated_secret_signs_alongside_the_previous_one(redis_client) -> None:
    hooks = WebhookStore(redis_client)
    old = hooks.rotate_secret("acme", now=1000.0)
    new = hooks.rotate_secret("acme", now=2000.0)
    assert old != new and new.startswith("whsec_")
    both = hooks.signing_secrets("acme", now=2001.0)
    assert both == [new, old]
    headers = signed_headers(both, "msg_1", b"{}", 2001.0)
    assert len(headers["webhook-signature"].split()) == 2
    assert verify(old, headers, b"{}", now=2001.0) and verify(new, headers, b"{}", now=2001.0)
    assert hooks.signing_secrets("acme", now=2000.0 + 25 * 3600) == [new]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://localhost:8080/",
        "http://10.0.0.5/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://[fe80::1]/",
        "ftp://example.com/",
        "not a url",
    ],
)
def test_targets_inside_the_network_are_refused(url: str) -> None:
    with pytest.raises(TargetRefused):
        check_target(url, allow_private=False)


def test_global_targets_and_allowed_private_ones_pass() -> None:
    check_target("https://8.8.8.8/hook", allow_private=False)
    check_target("http://127.0.0.1:9/hook", allow_private=True)
    with pytest.raises(TargetRefused):
        check_target("gopher://127.0.0.1/", allow_private=True)


def test_an_event_is_created_once_however_many_sweeps_emit_it(redis_client) -> None:
    hooks = WebhookStore(redis_client)
    hooks.watch("job:j1", "http://127.0.0.1:9/hook")
    assert list(hooks.watched()) == ["job:j1"]
    first = hooks.emit("acme", "job:j1", "job.succeeded", {"id": "j1"})
    assert first is not None and first.startswith("msg_")
    assert hooks.emit("acme", "job:j1", "job.succeeded", {"id": "j1"}) is None
    assert list(hooks.watched()) == []
    delivery = hooks.get(first)
    assert delivery.url == "http://127.0.0.1:9/hook" and delivery.state == "pending"
    assert [d.id for d in hooks.for_subject("job:j1")] == [first]
    assert [d.id for d in hooks.for_tenant("acme", 10)] == [first]
    hooks.watch("job:j2", "http://127.0.0.1:9/hook")
    hooks.unwatch("job:j2")  # a deleted job: no event
    assert hooks.emit("acme", "job:j2", "job.failed", {}) is None


def test_a_claim_is_leased_and_a_lost_lease_cannot_settle(redis_client) -> None:
    hooks = WebhookStore(redis_client)
    hooks.watch("job:j1", "http://127.0.0.1:9/hook")
    delivery_id = hooks.emit("acme", "job:j1", "job.succeeded", {"id": "j1"})
    now = hooks.get(delivery_id).created_at
    first = hooks.claim(lease_s=30, now=now)
    assert first is not None and first[0].id == delivery_id
    assert hooks.claim(lease_s=30, now=now + 1) is None  # leased to the first worker
    second = hooks.claim(lease_s=30, now=now + 31)  # the first worker died: lease ran out
    assert second is not None and second[0].id == delivery_id
    attempt = {"at": now, "status": 500, "error": "HTTP 500", "duration_s": 0.1}
    assert not hooks.settle(first[0], first[1], attempt, "pending", now + 5)
    assert hooks.settle(second[0], second[1], attempt, "pending", now + 100)
    after = hooks.get(delivery_id)
    assert after.attempt_count == 1 and after.attempts == [attempt]
    assert redis_client.zscore(DUE_KEY, delivery_id) == pytest.approx(now + 100)
    third = hooks.claim(lease_s=30, now=now + 100)
    assert hooks.settle(third[0], third[1], {**attempt, "status": 204}, "delivered", None)
    assert redis_client.zscore(DUE_KEY, delivery_id) is None
    assert hooks.get(delivery_id).state == "delivered" and hooks.get(delivery_id).attempt_count == 2


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_s(n, 5.0, 60.0) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_webhook_and_retention_settings_are_validated() -> None:
    settings = Settings.from_env(
        {"HEARTCLUSTER_WEBHOOK_ALLOW_PRIVATE": "yes", "HEARTCLUSTER_RETENTION_DAYS": "0"}
    )
    assert settings.webhook_allow_private and settings.retention_days == 0
    for name, value in (("WEBHOOK_ALLOW_PRIVATE", "maybe"), ("RETENTION_DAYS", "-1")):
        with pytest.raises(SettingsError, match=f"HEARTCLUSTER_{name}"):
            Settings.from_env({f"HEARTCLUSTER_{name}": value})
