"""Settings come from HEARTCLUSTER_* variables and bad values name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.core.config import Settings, SettingsError


def test_defaults_follow_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"HEARTCLUSTER_DATA_DIR": str(tmp_path / "data")})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.data_dir == tmp_path / "data"
    assert settings.storage_scheme == "file"
    assert settings.local_root == tmp_path / "data" / "artifacts"
    assert settings.model_dir is None
    assert settings.engine_max_rows == 16
    assert settings.max_upload_bytes == 50 * 1024 * 1024
    assert settings.job_time_limit_s == 3600


def test_default_data_dir_is_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.data_dir == tmp_path / "heartcluster-data"
    assert settings.storage_url == (tmp_path / "heartcluster-data" / "artifacts").as_uri()


def test_s3_storage_and_numbers_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "HEARTCLUSTER_STORAGE_URL": "s3://songs/prod/v1/",
            "HEARTCLUSTER_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
            "HEARTCLUSTER_MAX_DURATION_S": "240.5",
            "HEARTCLUSTER_MAX_TAGS": "8",
            "HEARTCLUSTER_MAX_TAG_BYTES": "50",
            "HEARTCLUSTER_MAX_JSON_DEPTH": "10",
            "HEARTCLUSTER_MAX_UPLOAD_SAMPLE_RATE": "48000",
            "HEARTCLUSTER_DTYPE": "bf16",
            "HEARTCLUSTER_MODEL_DIR": "/models",
            "UNRELATED": "ignored",
        }
    )
    assert (settings.storage_scheme, settings.s3_bucket, settings.s3_prefix) == (
        "s3",
        "songs",
        "prod/v1",
    )
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"
    assert settings.max_duration_s == 240.5
    assert settings.max_tags == 8
    assert (settings.max_tag_bytes, settings.max_json_depth) == (50, 10)
    assert settings.max_upload_sample_rate == 48_000
    assert settings.dtype == "bf16"
    assert settings.model_dir == Path("/models")


def test_empty_values_mean_default() -> None:
    assert Settings.from_env({"HEARTCLUSTER_MAX_TAGS": " "}).max_tags == 32


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "http://localhost:6379"),
        ("STORAGE_URL", "ftp://host/x"),
        ("STORAGE_URL", "s3:///prefix-without-bucket"),
        ("STORAGE_URL", "file://relative/path"),
        ("S3_ENDPOINT_URL", "localhost:9000"),
        ("DTYPE", "int8"),
        ("ENGINE_MAX_ROWS", "0"),
        ("ENGINE_MAX_ROWS", "two"),
        ("MAX_DURATION_S", "-5"),
        ("MAX_UPLOAD_BYTES", "1.5"),
        ("MAX_JSON_BYTES", "0"),
        ("MAX_UPLOAD_CHANNELS", "stereo"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"HEARTCLUSTER_{name}="):
        Settings.from_env({f"HEARTCLUSTER_{name}": value})


def test_endpoint_without_s3_storage_is_rejected() -> None:
    with pytest.raises(SettingsError, match="HEARTCLUSTER_S3_ENDPOINT_URL"):
        Settings.from_env(
            {
                "HEARTCLUSTER_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
                "HEARTCLUSTER_STORAGE_URL": "file:///tmp/x",
            }
        )


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.max_tags = 3  # type: ignore[misc]


def test_lease_periods_are_read_and_a_lease_must_outlive_missed_beats() -> None:
    settings = Settings.from_env(
        {
            "HEARTCLUSTER_LEASE_S": "3",
            "HEARTCLUSTER_HEARTBEAT_S": "1",
            "HEARTCLUSTER_STOP_GRACE_S": "0",
        }
    )
    assert (settings.lease_s, settings.heartbeat_s, settings.stop_grace_s) == (3.0, 1.0, 0.0)
    with pytest.raises(SettingsError, match="HEARTCLUSTER_LEASE_S=2.0 must be at least 3 x"):
        Settings.from_env({"HEARTCLUSTER_LEASE_S": "2", "HEARTCLUSTER_HEARTBEAT_S": "1"})


def test_adapter_serving_settings_are_parsed_and_checked() -> None:
    default = Settings.from_env({})
    assert (default.adapter_slots, default.adapter_max_rank) == (8, 64)
    assert "w2" in default.adapter_targets
    settings = Settings.from_env(
        {
            "HEARTCLUSTER_ADAPTER_SLOTS": "0",
            "HEARTCLUSTER_ADAPTER_MAX_RANK": "16",
            "HEARTCLUSTER_ADAPTER_TARGETS": "q_proj, decoder.w1",
        }
    )
    assert settings.adapter_slots == 0 and settings.adapter_max_rank == 16
    assert settings.adapter_targets == ("q_proj", "decoder.w1")
    with pytest.raises(SettingsError, match="HEARTCLUSTER_ADAPTER_TARGETS.*lm_head"):
        Settings.from_env({"HEARTCLUSTER_ADAPTER_TARGETS": "q_proj,lm_head"})
    with pytest.raises(SettingsError, match="HEARTCLUSTER_ADAPTER_MAX_RANK"):
        Settings.from_env({"HEARTCLUSTER_ADAPTER_MAX_RANK": "0"})


def test_engine_compile_and_cuda_graphs_are_off_unless_asked_for() -> None:
    assert not Settings.from_env({}).engine_compile
    assert not Settings.from_env({}).engine_cuda_graphs
    on = Settings.from_env(
        {"HEARTCLUSTER_ENGINE_COMPILE": "1", "HEARTCLUSTER_ENGINE_CUDA_GRAPHS": "true"}
    )
    assert on.engine_compile and on.engine_cuda_graphs
    with pytest.raises(SettingsError, match="HEARTCLUSTER_ENGINE_COMPILE"):
        Settings.from_env({"HEARTCLUSTER_ENGINE_COMPILE": "sometimes"})
