"""The IAM permissions the S3 backend needs: the one list every policy and every document follows.

Each S3 API operation the library calls is listed with the IAM actions it
needs; :data:`S3_IAM_ACTIONS` is their union.  The Terraform module
(``terraform/aws``), its README, the Kubernetes example (``job.yaml`` and its
README) and the Kubernetes guide grant or name exactly these actions, and
``tests/storage/test_s3_permissions.py`` fails when any of them drifts, or when
the code starts calling an operation that is not listed here.

>>> S3_BUCKET_ACTIONS
('s3:ListBucket', 's3:ListBucketMultipartUploads')
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["S3_BUCKET_ACTIONS", "S3_IAM_ACTIONS", "S3_OBJECT_ACTIONS", "S3_OPERATION_ACTIONS"]

#: boto3 operation name -> the IAM actions it needs (AWS Service Authorization Reference).
S3_OPERATION_ACTIONS: Mapping[str, tuple[str, ...]] = {
    # reads: whole objects, ranges, and HEAD for size, token and checksum
    "GetObject": ("s3:GetObject",),
    "HeadObject": ("s3:GetObject",),
    # writes: conditional puts (create-only commits, compare-and-swap pointers) and multipart uploads
    "PutObject": ("s3:PutObject",),
    "CreateMultipartUpload": ("s3:PutObject",),
    "UploadPart": ("s3:PutObject",),
    "CompleteMultipartUpload": ("s3:PutObject",),
    # server-side copies (cloudckpt cp, copy_checkpoint); CopyObject carries the source's tags over
    "CopyObject": ("s3:GetObject", "s3:PutObject", "s3:GetObjectTagging", "s3:PutObjectTagging"),
    "UploadPartCopy": ("s3:GetObject", "s3:PutObject"),
    # retention and garbage collection
    "DeleteObjects": ("s3:DeleteObject",),
    "PutObjectTagging": ("s3:PutObjectTagging",),  # cleanup="lifecycle" marks chunks for the bucket rule
    "AbortMultipartUpload": ("s3:AbortMultipartUpload",),
    # listings: manifests, chunks, and the uploads crashed writers left behind
    "ListObjectsV2": ("s3:ListBucket",),
    "ListMultipartUploads": ("s3:ListBucketMultipartUploads",),
}

#: Every IAM action the library needs, sorted.
S3_IAM_ACTIONS: tuple[str, ...] = tuple(sorted({a for actions in S3_OPERATION_ACTIONS.values() for a in actions}))
#: The actions granted on the bucket itself (``arn:aws:s3:::BUCKET``); the others apply to the
#: objects under the checkpoint prefix (``arn:aws:s3:::BUCKET/PREFIX/*``).
S3_BUCKET_ACTIONS: tuple[str, ...] = ("s3:ListBucket", "s3:ListBucketMultipartUploads")
#: The actions granted on the objects under the checkpoint prefix.
S3_OBJECT_ACTIONS: tuple[str, ...] = tuple(a for a in S3_IAM_ACTIONS if a not in S3_BUCKET_ACTIONS)
