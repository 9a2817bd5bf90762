# GCS bucket, lifecycle rules and IAM for cloudckpt checkpoints.
#
# The lifecycle rules implement the bucket side of cloudckpt's "lifecycle" cleanup
# mode: SweepConfig(cleanup="lifecycle") sets the customTime of unreferenced chunks
# to the moment of marking instead of deleting them, and the daysSinceCustomTime rule
# below deletes them.

locals {
  # Names shared with the library (cloudckpt/storage/lifecycle.py). They are not
  # variables because the library hard-codes them; tests/terraform/test_terraform.py
  # compares these values with the Python constants.
  chunk_prefix = "chunks/" # CHUNK_PREFIX
  # Where GCSStorage.multipart keeps the part objects of unfinished uploads
  # (cloudckpt.storage.gcs.UPLOADS_PREFIX).
  uploads_prefix = ".cloudckpt/uploads/"

  # Object-name prefixes under the checkpoint root gs://<bucket>/<prefix>/.
  root_name_prefix    = "${var.prefix}/"
  chunks_name_prefix  = "${var.prefix}/${local.chunk_prefix}"
  uploads_name_prefix = "${var.prefix}/${local.uploads_prefix}"

  # IAM condition of the object role: objects under the prefix, plus object listings
  # whose prefix lies under it. storage.objects.list is checked against the bucket
  # (resource.name "projects/_/buckets/<bucket>"), so the resource.name clause alone
  # would deny every listing the library makes.
  object_resource_prefix = "projects/_/buckets/${google_storage_bucket.this.name}/objects/${var.prefix}/"
  object_condition       = "resource.name.startsWith(\"${local.object_resource_prefix}\")"
  list_condition         = "api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"${local.root_name_prefix}\")"
  prefix_condition       = "${local.object_condition} || ${local.list_condition}"

  workload_identity = var.k8s_namespace != null && var.k8s_service_account != null
}

# -- bucket -------------------------------------------------------------------

data "google_storage_project_service_account" "this" {
  count   = var.kms_key_name == null ? 0 : 1
  project = var.project_id
}

# CMEK: the Cloud Storage service agent encrypts and decrypts with the key, not the
# callers; the training service account needs no KMS role.
resource "google_kms_crypto_key_iam_member" "gcs_agent" {
  count         = var.kms_key_name == null ? 0 : 1
  crypto_key_id = var.kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${data.google_storage_project_service_account.this[0].email_address}"
}

resource "google_storage_bucket" "this" {
  #checkov:skip=CKV_GCP_62:Usage logging is optional (var.access_log_bucket) because the log bucket is deployment-specific; checkov cannot see the conditional logging block.
  #checkov:skip=CKV_GCP_78:Versioning is optional (var.versioning, with a noncurrent-version rule); default off because checkpoint data is content-addressed and immutable and manifests are written create-only, so versions would only keep deleted chunks billable.
  name                        = var.bucket_name
  project                     = var.project_id
  location                    = var.location
  storage_class               = var.storage_class
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy
  labels                      = var.labels

  versioning {
    enabled = var.versioning
  }

  dynamic "encryption" {
    for_each = var.kms_key_name == null ? [] : [var.kms_key_name]
    content {
      default_kms_key_name = encryption.value
    }
  }

  dynamic "logging" {
    for_each = var.access_log_bucket == null ? [] : [var.access_log_bucket]
    content {
      log_bucket = logging.value
    }
  }

  dynamic "soft_delete_policy" {
    for_each = var.soft_delete_retention_seconds == null ? [] : [var.soft_delete_retention_seconds]
    content {
      retention_duration_seconds = soft_delete_policy.value
    }
  }

  # (a) cloudckpt's lifecycle cleanup: the sweeper sets customTime on unreferenced
  #     chunks; delete them expire_after_days later.
  lifecycle_rule {
    condition {
      matches_prefix         = [local.chunks_name_prefix]
      days_since_custom_time = var.expire_after_days
      with_state             = "LIVE"
    }
    action {
      type = "Delete"
    }
  }

  # (b) GCS has no S3-style multipart uploads; cloudckpt stores parts as temporary
  #     objects and composes them. Parts of uploads whose writer died are deleted here.
  lifecycle_rule {
    condition {
      matches_prefix = [local.uploads_name_prefix]
      age            = var.abort_incomplete_upload_days
      with_state     = "LIVE"
    }
    action {
      type = "Delete"
    }
  }

  # (c) Optional: move chunk data to a colder class.
  dynamic "lifecycle_rule" {
    for_each = var.transition_days == null ? [] : [var.transition_days]
    content {
      condition {
        matches_prefix = [local.chunks_name_prefix]
        age            = lifecycle_rule.value
        with_state     = "LIVE"
      }
      action {
        type          = "SetStorageClass"
        storage_class = var.transition_storage_class
      }
    }
  }

  # With versioning: delete versions some days after they became noncurrent.
  dynamic "lifecycle_rule" {
    for_each = var.versioning ? [var.noncurrent_version_days] : []
    content {
      condition {
        days_since_noncurrent_time = lifecycle_rule.value
        with_state                 = "ARCHIVED"
      }
      action {
        type = "Delete"
      }
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.gcs_agent]
}

# -- IAM ----------------------------------------------------------------------

resource "google_service_account" "checkpoint" {
  project      = var.project_id
  account_id   = var.service_account_id
  display_name = "cloudckpt checkpoints"
  description  = "Reads and writes cloudckpt checkpoints under gs://${var.bucket_name}/${var.prefix}/"
}

resource "google_storage_bucket_iam_member" "checkpoint" {
  bucket = google_storage_bucket.this.name
  role   = var.object_role
  member = "serviceAccount:${google_service_account.checkpoint.email}"

  condition {
    title       = "cloudckpt-prefix"
    description = "Only objects under gs://${var.bucket_name}/${var.prefix}/ (and listings of that prefix)"
    expression  = local.prefix_condition
  }
}

# GKE Workload Identity: pods running as <namespace>/<service account> act as the
# Google service account.
resource "google_service_account_iam_member" "workload_identity" {
  count              = local.workload_identity ? 1 : 0
  service_account_id = google_service_account.checkpoint.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.k8s_namespace}/${var.k8s_service_account}]"
}
