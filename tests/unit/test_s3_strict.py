"""The image store against a strict S3 stand-in (tests/s3_strict.py: HTTPS on loopback,
refusing aws-chunked bodies and DeleteObjects without Content-MD5, as Alibaba OSS does),
with configs/production.yaml's storage options. moto alone accepts what OSS refuses."""

from __future__ import annotations

import copy
import time
import uuid
from pathlib import Path

import botocore.session
import pytest
import yaml
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from serve_app.config import AppConfig
from serve_app.errors import NotFound
from serve_app.store import ImageStore
from tests.s3_strict import strict_s3

BUCKET = "sdxl-turbo-images"
PRODUCTION = Path(__file__).resolve().parents[2] / "configs" / "production.yaml"


def production_store() -> tuple[str, dict]:
    config = AppConfig.model_validate(
        yaml.safe_load(PRODUCTION.read_text())["applications"][0]["args"])
    return config.store.url or "", copy.deepcopy(config.store.storage_options)


@pytest.fixture
def standin(tmp_path):
    with strict_s3(tmp_path) as s3:
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=s3.endpoint, aws_access_key_id="test",
            aws_secret_access_key="test", region_name="us-east-1", verify=str(s3.ca_file),
            config=Config(request_checksum_calculation="when_required"))
        client.create_bucket(Bucket=BUCKET)
        yield s3


def store_on(s3, storage_options: dict) -> ImageStore:
    url, _ = production_store()
    options = {**storage_options, "endpoint_url": s3.endpoint, "key": "test", "secret": "test",
               "client_kwargs": {"verify": str(s3.ca_file)}}
    return ImageStore(url, options)


def test_production_store_options_put_get_record_and_clean_up_on_the_strict_endpoint(standin):
    url, options = production_store()
    assert url == f"s3://{BUCKET}/images"
    store = store_on(standin, options)
    image_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    store.put(image_id, "0_0.png", b"png-0")
    store.put(image_id, "image_grid.png", b"grid")
    assert store.get(image_id, "0_0.png") == b"png-0"
    store.put_record(f"job-{job_id}", b'{"status": "queued"}')
    store.put_record(f"job-{job_id}", b'{"status": "succeeded"}')
    assert store.get_record(f"job-{job_id}") == b'{"status": "succeeded"}'
    store.put_record(f"step-{job_id}-0", b"{}")
    store.delete_record(f"step-{job_id}-0")
    with pytest.raises(NotFound):
        store.get_record(f"step-{job_id}-0")
    assert store.cleanup(ttl_s=3600) == 0
    assert store.get(image_id, "image_grid.png") == b"grid"
    # Everything expired: the id and the record are gone, each by one DeleteObject.
    assert store.cleanup(ttl_s=60, now=time.time() + 3600) == 1
    with pytest.raises(NotFound):
        store.get(image_id, "0_0.png")
    with pytest.raises(NotFound):
        store.get_record(f"job-{job_id}")
    assert standin.refused == []
    deletes = sorted(path for method, path in standin.seen if method == "DELETE")
    assert deletes == sorted([
        f"/{BUCKET}/images/jobs/step-{job_id}-0.json",
        f"/{BUCKET}/images/{image_id}/0_0.png",
        f"/{BUCKET}/images/{image_id}/image_grid.png",
        f"/{BUCKET}/images/jobs/job-{job_id}.json",
    ])


def test_the_stand_in_refuses_botocore_defaults_as_oss_does(standin):
    """Without production's checksum settings, the first put fails: the stand-in is strict."""
    _, options = production_store()
    del options["config_kwargs"]
    store = store_on(standin, options)
    with pytest.raises(OSError, match="aws-chunked encoding is not supported"):
        store.put(uuid.uuid4().hex, "0_0.png", b"png")
    # A bulk delete without Content-MD5 (fsspec's rm on s3fs) is refused too.
    with pytest.raises(OSError, match="Content-MD5"):
        store.fs.rm(f"{BUCKET}/images/{uuid.uuid4().hex}/0_0.png")
    assert [why for _, _, why in standin.refused] == [
        "aws-chunked encoding is not supported",
        "Missing required header for this request: Content-MD5"]


def prepared_put(storage_options: dict):
    """The PutObject botocore would send with these options (s3fs builds its client's
    Config from config_kwargs), captured before it leaves: no network."""
    sent = []

    class EmptyBody:
        def stream(self):
            return iter([b""])

    def capture(request, **_):
        sent.append(request)
        return AWSResponse(request.url, 200, {}, EmptyBody())

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=storage_options["endpoint_url"], region_name="cn-hangzhou",
        aws_access_key_id="k", aws_secret_access_key="s",
        config=Config(**storage_options.get("config_kwargs", {})))
    client.meta.events.register("before-send.s3.PutObject", capture)
    client.put_object(Bucket=BUCKET, Key="images/x/0_0.png", Body=b"png")
    (request,) = sent
    return request


def test_production_options_send_a_plain_put_to_the_bucket_host():
    _, options = production_store()
    request = prepared_put(options)
    assert request.url == (
        f"https://{BUCKET}.oss-cn-hangzhou-internal.aliyuncs.com/images/x/0_0.png")
    assert "aws-chunked" not in request.headers.get("Content-Encoding", b"").decode()
    assert "x-amz-trailer" not in request.headers
    assert not request.headers["x-amz-content-sha256"].decode().startswith("STREAMING-")
    assert request.body.read() == b"png"


def test_botocore_defaults_would_send_aws_chunked_with_a_trailer():
    """What production's settings turn off (botocore >= 1.36 over HTTPS)."""
    _, options = production_store()
    request = prepared_put({"endpoint_url": options["endpoint_url"]})
    assert request.headers["Content-Encoding"] == b"aws-chunked"
    assert request.headers["x-amz-trailer"] == b"x-amz-checksum-crc32"
