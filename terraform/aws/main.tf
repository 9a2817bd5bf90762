# S3 bucket, lifecycle rules and IAM for cloudckpt checkpoints.
#
# The lifecycle rules implement the bucket side of cloudckpt's "lifecycle" cleanup
# mode: SweepConfig(cleanup="lifecycle") tags unreferenced chunks instead of
# deleting them, and the rule below deletes tagged chunks.

locals {
  # Names shared with the library (cloudckpt/storage/lifecycle.py). They are not
  # variables because the library hard-codes them; tests/terraform/test_terraform.py
  # compares these values with the Python constants.
  expired_tag_key   = "cloudckpt-expired" # EXPIRED_TAG_KEY
  expired_tag_value = "true"              # EXPIRED_TAG_VALUE
  chunk_prefix      = "chunks/"           # CHUNK_PREFIX

  # Key prefixes under the checkpoint root s3://<bucket>/<prefix>/.
  root_key_prefix   = "${var.prefix}/"
  chunks_key_prefix = "${var.prefix}/${local.chunk_prefix}"

  create_role = var.oidc_provider_arn != null
  # oidc.eks.<region>.amazonaws.com/id/<id>: the issuer that prefixes IRSA condition keys.
  oidc_issuer = local.create_role ? element(split(":oidc-provider/", var.oidc_provider_arn), 1) : ""
}

# -- bucket -------------------------------------------------------------------

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage cost; checkpoints are re-creatable training state, and replication is a per-deployment decision outside this module.
  #checkov:skip=CKV2_AWS_62:Nothing consumes S3 event notifications for checkpoints; cloudckpt reads pointer objects instead of reacting to events.
  #checkov:skip=CKV_AWS_145:SSE-KMS is optional by design (var.kms_key_arn); without a key the bucket uses SSE-S3 (AES256) default encryption, set by aws_s3_bucket_server_side_encryption_configuration below.
  #checkov:skip=CKV_AWS_21:Versioning is optional (var.versioning, with noncurrent-version expiration); default off because checkpoint data is content-addressed and immutable and manifests are written create-only, so versions would only keep deleted chunks billable.
  #checkov:skip=CKV_AWS_18:Access logging is optional (var.access_log_bucket) because the log target bucket is account-specific; checkov cannot see the conditionally created aws_s3_bucket_logging.
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
  tags          = var.tags
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    # S3 Bucket Keys cut KMS request costs (every chunk is its own object).
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_versioning" "this" {
  count  = var.versioning ? 1 : 0
  bucket = aws_s3_bucket.this.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_logging" "this" {
  count         = var.access_log_bucket == null ? 0 : 1
  bucket        = aws_s3_bucket.this.id
  target_bucket = var.access_log_bucket
  target_prefix = var.access_log_prefix
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid       = "DenyOutdatedTls"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.bucket.json

  # The public access block must exist first, or S3 may evaluate the policy against
  # a bucket that still allows public policies.
  depends_on = [aws_s3_bucket_public_access_block.this]
}

# -- lifecycle ----------------------------------------------------------------

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  # (a) cloudckpt's lifecycle cleanup: the sweeper tags unreferenced chunks
  #     <EXPIRED_TAG_KEY>=<EXPIRED_TAG_VALUE>; this rule deletes them.
  rule {
    id     = "cloudckpt-expire-marked-chunks"
    status = "Enabled"

    filter {
      and {
        prefix = local.chunks_key_prefix
        tags = {
          (local.expired_tag_key) = local.expired_tag_value
        }
      }
    }

    expiration {
      days = var.expire_after_days
    }
  }

  # (b) Multipart uploads left behind by writers that died mid-save. Bucket-wide (an
  #     empty filter): the bucket is dedicated to checkpoints, and an upload nobody
  #     completed within the period is garbage wherever it is.
  rule {
    id     = "cloudckpt-abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_upload_days
    }
  }

  # (c) Optional: move chunk data to a colder class that is still read without a restore.
  #     Objects of 128 KiB or less are left alone (S3 bills them as 128 KiB in IA classes).
  #     Off (status "Disabled") while var.transition_days is null; 30 is then only a valid
  #     placeholder for the inert rule.
  rule {
    id     = "cloudckpt-transition-chunks"
    status = var.transition_days == null ? "Disabled" : "Enabled"

    filter {
      and {
        prefix                   = local.chunks_key_prefix
        object_size_greater_than = 131072
      }
    }

    transition {
      days          = coalesce(var.transition_days, 30)
      storage_class = var.transition_storage_class
    }
  }

  # With versioning: drop overwritten/deleted versions after a while, and the delete
  # markers they leave. Disabled (and without effect) on an unversioned bucket.
  rule {
    id     = "cloudckpt-expire-noncurrent-versions"
    status = var.versioning ? "Enabled" : "Disabled"

    filter {
      prefix = local.root_key_prefix
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    expiration {
      expired_object_delete_marker = true
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

# -- IAM ----------------------------------------------------------------------

data "aws_iam_policy_document" "checkpoint" {
  # Everything the library does to objects: reads (GetObject also covers HEAD and
  # ranged reads), conditional writes and multipart uploads (PutObject), server-side
  # copies (GetObject + PutObject, and the tags they carry over), deletes, lifecycle
  # marks (PutObjectTagging) and aborting stale uploads.  The library's own list is
  # cloudckpt.storage.s3_permissions.S3_IAM_ACTIONS; a test keeps this policy equal to it.
  statement {
    sid    = "CheckpointObjects"
    effect = "Allow"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:PutObjectTagging",
      "s3:GetObjectTagging",
      "s3:AbortMultipartUpload",
    ]
    resources = ["${aws_s3_bucket.this.arn}/${local.root_key_prefix}*"]
  }

  statement {
    sid       = "ListCheckpointPrefix"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.root_key_prefix}*"]
    }
  }

  # ListBucketMultipartUploads does not support the s3:prefix condition key (AWS
  # Service Authorization Reference), so a prefix condition would always deny it and
  # break the sweeper's search for stale uploads. It reveals key names and upload ids
  # only; reading, completing or aborting an upload stays scoped to the prefix above.
  statement {
    sid       = "ListMultipartUploads"
    effect    = "Allow"
    actions   = ["s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.this.arn]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "CheckpointKmsKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_policy" "checkpoint" {
  name        = "${var.name}-checkpoints"
  description = "Read/write cloudckpt checkpoints under s3://${var.bucket_name}/${var.prefix}/"
  policy      = data.aws_iam_policy_document.checkpoint.json
  tags        = var.tags
}

data "aws_iam_policy_document" "irsa_trust" {
  count = local.create_role ? 1 : 0

  statement {
    sid     = "EksServiceAccount"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "checkpoint" {
  count              = local.create_role ? 1 : 0
  name               = "${var.name}-checkpoints"
  description        = "IRSA role of ${coalesce(var.k8s_namespace, "?")}/${coalesce(var.k8s_service_account, "?")} for cloudckpt checkpoints"
  assume_role_policy = data.aws_iam_policy_document.irsa_trust[0].json
  tags               = var.tags

  lifecycle {
    precondition {
      condition     = var.k8s_namespace != null && var.k8s_service_account != null
      error_message = "k8s_namespace and k8s_service_account are required when oidc_provider_arn is set."
    }
  }
}

resource "aws_iam_role_policy_attachment" "checkpoint" {
  count      = local.create_role ? 1 : 0
  role       = aws_iam_role.checkpoint[0].name
  policy_arn = aws_iam_policy.checkpoint.arn
}
