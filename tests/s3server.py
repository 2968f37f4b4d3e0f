"""A real S3-compatible HTTP server for the tests: moto's server mode (`moto[server]`) on 127.0.0.1 at a
free port, with request authentication on (moto checks each request's signature against the access keys of
its IAM, so wrong credentials are refused as S3 refuses them). With CACHEFEAT_S3_TEST_ENDPOINT set, the tests
use that server instead (a MinIO container, say), with the keys in CACHEFEAT_S3_TEST_KEY and
CACHEFEAT_S3_TEST_SECRET (docs/object-storage.md, "Testing against your own server")."""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    region: str = "us-east-1"
    moto: object = None            # the ThreadedMotoServer, when the tests started it

    def env(self, **changes) -> dict[str, str]:
        """The environment variables cachefeat reads (store.remote) to reach this server."""
        out = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
               "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region,
               "AWS_ALLOW_HTTP": "true" if self.endpoint.startswith("http://") else "false"}
        out.update(changes)
        return out

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=self.region)

    def new_bucket(self) -> str:
        name = f"cachefeat-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.moto is not None:
            self.moto.stop()


def external() -> bool:
    """The tests use a server of the environment's (CACHEFEAT_S3_TEST_ENDPOINT), not a moto server of their own."""
    return bool(os.environ.get("CACHEFEAT_S3_TEST_ENDPOINT"))


def start() -> S3Server:
    """The server the tests use: CACHEFEAT_S3_TEST_ENDPOINT's, else a fresh moto server in this process."""
    endpoint = os.environ.get("CACHEFEAT_S3_TEST_ENDPOINT")
    if endpoint:
        return S3Server(endpoint, os.environ["CACHEFEAT_S3_TEST_KEY"], os.environ["CACHEFEAT_S3_TEST_SECRET"],
                        os.environ.get("CACHEFEAT_S3_TEST_REGION", "us-east-1"))
    return start_moto()


def start_moto() -> S3Server:
    """moto on 127.0.0.1 at a free port. Its first requests (no authentication yet) make an IAM user with an
    access key allowed everything; from then on every request must be signed with that key."""
    import logging

    import boto3
    from moto import settings
    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # no line per request
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
                       region_name="us-east-1")
    if not hasattr(start_moto, "key"):        # moto's IAM is one per process: one user for every server
        iam.create_user(UserName="cachefeat-tests")
        iam.put_user_policy(UserName="cachefeat-tests", PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName="cachefeat-tests")["AccessKey"]
        start_moto.key = (key["AccessKeyId"], key["SecretAccessKey"])
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0       # every request from now on is authenticated
    return S3Server(endpoint, *start_moto.key, moto=server)
