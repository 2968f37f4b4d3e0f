"""A real S3-compatible HTTP server for the tests: moto's server mode (`moto[server]`) on 127.0.0.1 at a
free port, with request authentication on (moto checks each request's signature against the access keys of
its IAM, so wrong credentials are refused as S3 refuses them). With CACHEFEAT_S3_TEST_ENDPOINT set, the tests
use that server instead (a MinIO container, say), with the keys in CACHEFEAT_S3_TEST_KEY and
CACHEFEAT_S3_TEST_SECRET (docs/object-storage.md, "Testing against your own server")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
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

    def plant_lease(self, bucket: str, key: str, minutes: float) -> dict:
        """Another push's lease (pid 4242 on host elsewhere) at `key`, expiring `minutes` from now (< 0:
        expired): what a writer on another machine leaves."""
        from datetime import datetime, timedelta, timezone
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        now = datetime.now(timezone.utc)
        lease = {"host": "elsewhere", "pid": 4242, "since": (now - timedelta(minutes=20)).strftime(fmt),
                 "expires": (now + timedelta(minutes=minutes)).strftime(fmt), "token": "ab" * 16}
        self.client().put_object(Bucket=bucket, Key=key, Body=json.dumps(lease).encode())
        return lease

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


@contextmanager
def serve_in_child():
    """start_moto in a child process, so that the server has a GIL of its own (the benchmarks measure the
    client beside it): yields (its S3Server, made here from the endpoint and keys it prints, and the child's
    pid). The child serves until its stdin closes."""
    code = ("import json, sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import s3server\n"
            "s = s3server.start_moto()\n"
            "print(json.dumps([s.endpoint, s.key, s.secret, s.region]), flush=True)\n"
            "sys.stdin.read()\n"
            "s.stop()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"moto's S3 server did not start (exit status {proc.wait(30)})")
        yield S3Server(*json.loads(line)), proc.pid
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
