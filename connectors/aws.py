"""boto3 clients as every AWS connector here makes them: boto3's standard credential chain
and region settings (environment, shared config, instance or task role), the endpoint from
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_<SERVICE> (boto3 reads those itself: MinIO, moto and
other compatible services), and botocore's standard retry mode, which retries throttling
(503 SlowDown), 500/502/503/504 and dropped connections with exponential backoff and
jitter. boto3 is imported here only, so the package runs without it until S3 or DynamoDB
is asked for."""

from __future__ import annotations

import os
from typing import Any

# Attempts in all (the first one included); standard mode's default is 3, too few to ride
# out a burst of SlowDown from a prefix that S3 is still scaling up.
MAX_ATTEMPTS = int(os.environ.get("STREAMS_AWS_MAX_ATTEMPTS", "10"))


def client(service: str) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # pragma: no cover - the aws extra is not installed
        raise ValueError(f"{service}: boto3 is not installed; pip install "
                         "'audience-streams[aws]'") from None
    options: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": MAX_ATTEMPTS}}
    if service == "s3" and _custom_endpoint(service):
        # S3-compatible servers (MinIO, moto) rarely resolve bucket.host names.
        options["s3"] = {"addressing_style": "path"}
    return boto3.session.Session().client(service, config=Config(**options))


def _custom_endpoint(service: str) -> bool:
    return bool(os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}")
                or os.environ.get("AWS_ENDPOINT_URL"))


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


# What a user can put right, by AWS error code: named in the one-line messages.
_REASONS = {"NoSuchBucket": "no such bucket", "NoSuchKey": "no such object",
            "404": "no such object", "AccessDenied": "access denied",
            "AccessDeniedException": "access denied", "403": "access denied",
            "InvalidAccessKeyId": "unknown access key",
            "UnrecognizedClientException": "unknown access key",
            "SignatureDoesNotMatch": "wrong secret key",
            "InvalidSignatureException": "wrong secret key",
            "ExpiredToken": "expired credentials",
            "ExpiredTokenException": "expired credentials",
            "PreconditionFailed": "the object changed while it was being read"}


def reason(exc: BaseException) -> str:
    """Why an AWS call failed, in a few words (its error code's meaning, or the error)."""
    why = _REASONS.get(error_code(exc))
    if why is None and type(exc).__name__ == "NoCredentialsError":
        why = "no AWS credentials found"
    return why or f"{type(exc).__name__}: {exc}"


def is_aws_error(exc: BaseException) -> bool:
    """An error botocore raised: a service's answer (ClientError) or a client-side one
    (no credentials, no region, an unreachable endpoint, a waiter that gave up)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, (BotoCoreError, ClientError))


def is_stream_error(exc: BaseException) -> bool:
    """A response body that broke off (reset, timeout, short read): worth reading again."""
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError  # botocore's own HTTP library

    return isinstance(exc, (BotoCoreError, HTTPError, OSError))
