"""The service fixtures answer over their real protocols."""

from __future__ import annotations

import boto3


def test_redis_server_answers(redis_client) -> None:
    redis_client.set("probe", "1")
    assert redis_client.get("probe") == b"1"
    assert redis_client.config_get("save")["save"] == ""


def test_s3_server_speaks_s3(s3_endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="probe-bucket")
    s3.put_object(Bucket="probe-bucket", Key="a/b", Body=b"xyz")
    assert s3.get_object(Bucket="probe-bucket", Key="a/b")["Body"].read() == b"xyz"
    s3.delete_object(Bucket="probe-bucket", Key="a/b")
    s3.delete_bucket(Bucket="probe-bucket")
