"""Images in an S3-compatible store (moto server on loopback), served by any ingress."""

import boto3
import httpx

from tests.integration.conftest import fake_args, post


def test_images_live_in_the_bucket_and_every_ingress_replica_serves_them(deployed, moto_s3,
                                                                         tmp_path):
    s3 = boto3.client("s3", endpoint_url=moto_s3, aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")
    s3.create_bucket(Bucket="sd-images")
    url = deployed("s3", fake_args(
        tmp_path,
        ingress={"num_replicas": 2},
        store={"url": "s3://sd-images/images",
               "storage_options": {"endpoint_url": moto_s3, "key": "test", "secret": "test"}},
    ))
    body = post(url, {"prompt": "p", "number": 2}).json()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="sd-images")["Contents"])
    assert keys == [f"images/{body['id']}/{name}"
                    for name in ("0_0.png", "1_0.png", "image_grid.png")]
    stored = s3.get_object(Bucket="sd-images", Key=f"images/{body['id']}/0_0.png")["Body"].read()
    # Requests spread over both ingress replicas; each must find the image in the bucket.
    fetched = [httpx.get(body["output"][0]["url"]) for _ in range(12)]
    assert {r.status_code for r in fetched} == {200}
    assert {r.content for r in fetched} == {stored}
    assert httpx.get(f"{url}/images/{'0' * 32}/0_0.png").status_code == 404

    # Job submissions with one Idempotency-Key, at once, spread over both ingress replicas:
    # the key's record is created only if absent (If-None-Match), so one job exists.
    from concurrent.futures import ThreadPoolExecutor

    key = {"Idempotency-Key": "s3-order-1"}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: httpx.post(
            f"{url}/api/jobs", json={"prompt": "once"}, headers=key, timeout=30), range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    (job_id,) = {r.json()["id"] for r in responses}
    records = [o["Key"] for o in s3.list_objects_v2(
        Bucket="sd-images", Prefix="images/jobs/job-")["Contents"]]
    assert records == [f"images/jobs/job-{job_id}.json"]


def test_a_whole_job_runs_against_the_strict_oss_like_endpoint(deployed, tmp_path):
    """configs/production.yaml's storage options on an HTTPS S3 stand-in that refuses what
    Alibaba OSS refuses (tests/s3_strict.py): the job's record, its step progress, its images
    and the image URLs all work through the ingress and JobConsumer replicas."""
    from pathlib import Path

    import botocore.session
    import yaml
    from botocore.config import Config

    from serve_app.config import AppConfig
    from tests.integration.conftest import submit, wait_done
    from tests.s3_strict import strict_s3

    production_yaml = Path(__file__).resolve().parents[2] / "configs" / "production.yaml"
    production = AppConfig.model_validate(
        yaml.safe_load(production_yaml.read_text())["applications"][0]["args"]).store
    with strict_s3(tmp_path) as standin:
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=standin.endpoint, aws_access_key_id="test",
            aws_secret_access_key="test", region_name="us-east-1", verify=str(standin.ca_file),
            config=Config(request_checksum_calculation="when_required"))
        client.create_bucket(Bucket="sdxl-turbo-images")
        url = deployed("s3strict", fake_args(
            tmp_path,
            store={"url": production.url,
                   "storage_options": {**production.storage_options,
                                       "endpoint_url": standin.endpoint,
                                       "key": "test", "secret": "test",
                                       "client_kwargs": {"verify": str(standin.ca_file)}}},
        ))
        accepted = submit(url, {"prompt": "strict", "number": 2, "seed": 3}).json()
        record = wait_done(accepted["statusUrl"])
        assert record["status"] == "succeeded"
        assert record["attempts"] == 1
        output = record["result"]["output"]
        fetched = [httpx.get(o["url"]) for o in output]
        assert [r.status_code for r in fetched] == [200, 200]
        image_id = output[0]["url"].rsplit("/", 2)[1]
        keys = sorted(o["Key"] for o in client.list_objects_v2(
            Bucket="sdxl-turbo-images", Prefix=f"images/{image_id}/")["Contents"])
        assert keys == [f"images/{image_id}/{name}"
                        for name in ("0_0.png", "1_0.png", "image_grid.png")]
        assert standin.refused == []


def test_every_object_the_service_writes_asks_for_server_side_encryption(deployed, moto_s3,
                                                                          tmp_path):
    """storage_options.s3_additional_kwargs ServerSideEncryption (what confidential mode
    requires, and the tdx overlay sets to KMS for OSS): images, the grid and job records all
    go up with the x-amz-server-side-encryption header (moto stores and reports it)."""
    s3 = boto3.client("s3", endpoint_url=moto_s3, aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")
    s3.create_bucket(Bucket="sse-images")
    url = deployed("s3sse", fake_args(
        tmp_path,
        store={"url": "s3://sse-images/images",
               "storage_options": {"endpoint_url": moto_s3, "key": "test", "secret": "test",
                                   "s3_additional_kwargs": {"ServerSideEncryption": "KMS"}}},
    ))
    body = post(url, {"prompt": "p", "number": 2, "step": 1}).json()
    job = httpx.post(f"{url}/api/jobs", json={"prompt": "j", "step": 1}, timeout=30).json()
    from tests.integration.conftest import wait_done

    assert wait_done(job["statusUrl"])["status"] == "succeeded"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="sse-images")["Contents"]]
    assert f"images/{body['id']}/image_grid.png" in keys
    assert f"images/jobs/job-{job['id']}.json" in keys
    modes = {key: s3.head_object(Bucket="sse-images", Key=key).get("ServerSideEncryption")
             for key in keys}
    assert set(modes.values()) == {"KMS"}, modes
