variable "project_id" {
  description = "Project that owns the bucket, the service account and (for Workload Identity) the GKE cluster."
  type        = string
}

variable "bucket_name" {
  description = "Name of the GCS bucket that holds the checkpoints (created by this module)."
  type        = string
}

variable "location" {
  description = "Bucket location: a region (e.g. us-central1, next to the GPUs) or a multi-/dual-region."
  type        = string
}

variable "prefix" {
  description = <<-EOT
    Object-name prefix of the checkpoint root inside the bucket: the library is pointed
    at gs://<bucket_name>/<prefix>/ (latest.ckpt, *.ckpt manifests and chunks/ live right
    below it). The lifecycle rules and the IAM condition are scoped to this prefix.
    No leading or trailing slash.
  EOT
  type        = string
  default     = "checkpoints"

  validation {
    condition     = can(regex("^[^/](.*[^/])?$", var.prefix))
    error_message = "The prefix must be non-empty and must not start or end with '/'."
  }
}

variable "storage_class" {
  description = "Default storage class of new objects."
  type        = string
  default     = "STANDARD"
}

variable "kms_key_name" {
  description = <<-EOT
    Cloud KMS key (projects/<p>/locations/<l>/keyRings/<r>/cryptoKeys/<k>) for CMEK
    default encryption. The module grants the project's Cloud Storage service agent
    encrypt/decrypt on it. null: Google-managed encryption.
  EOT
  type        = string
  default     = null
}

variable "versioning" {
  description = "Enable object versioning. Noncurrent versions are deleted after noncurrent_version_days."
  type        = bool
  default     = false
}

variable "noncurrent_version_days" {
  description = "With versioning on: days after an object version became noncurrent before it is deleted."
  type        = number
  default     = 7

  validation {
    condition     = var.noncurrent_version_days >= 1
    error_message = "noncurrent_version_days must be at least 1."
  }
}

variable "expire_after_days" {
  description = <<-EOT
    Days after marking (the object's customTime) at which chunks marked by cloudckpt
    (SweepConfig(cleanup="lifecycle")) are deleted. The default equals
    cloudckpt.storage.lifecycle.EXPIRE_AFTER_DAYS.
  EOT
  type        = number
  default     = 1

  validation {
    condition     = var.expire_after_days >= 1
    error_message = "expire_after_days must be at least 1."
  }
}

variable "abort_incomplete_upload_days" {
  description = <<-EOT
    Age in days after which the temporary part objects of unfinished multipart uploads
    (under <prefix>/.cloudckpt/uploads/, left by writers that died mid-save) are
    deleted. The default equals cloudckpt.storage.lifecycle.EXPIRE_AFTER_DAYS.
  EOT
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_upload_days >= 1
    error_message = "abort_incomplete_upload_days must be at least 1."
  }
}

variable "transition_days" {
  description = "Move chunk objects to transition_storage_class this many days after creation. null (the default) disables it."
  type        = number
  default     = null
}

variable "transition_storage_class" {
  description = "Storage class for transition_days (all are read directly; colder ones have minimum storage durations and retrieval fees)."
  type        = string
  default     = "NEARLINE"

  validation {
    condition     = contains(["NEARLINE", "COLDLINE", "ARCHIVE"], var.transition_storage_class)
    error_message = "transition_storage_class must be NEARLINE, COLDLINE or ARCHIVE."
  }
}

variable "soft_delete_retention_seconds" {
  description = <<-EOT
    Soft-delete retention of the bucket. Deleted chunks stay billable for this long;
    0 turns soft delete off. null keeps the GCS default (7 days).
  EOT
  type        = number
  default     = null
}

variable "service_account_id" {
  description = "account_id of the Google service account the training jobs use."
  type        = string
  default     = "cloudckpt"
}

variable "object_role" {
  description = "Role granted to the service account on the bucket, conditioned on the prefix."
  type        = string
  default     = "roles/storage.objectUser"

  validation {
    condition     = contains(["roles/storage.objectUser", "roles/storage.objectAdmin"], var.object_role)
    error_message = "object_role must be roles/storage.objectUser or roles/storage.objectAdmin."
  }
}

variable "k8s_namespace" {
  description = "Kubernetes namespace of the training pods' service account; with k8s_service_account enables the Workload Identity binding."
  type        = string
  default     = null
}

variable "k8s_service_account" {
  description = "Kubernetes service account the training pods run as; with k8s_namespace enables the Workload Identity binding."
  type        = string
  default     = null
}

variable "access_log_bucket" {
  description = "Existing bucket that receives usage logs of this bucket. null disables usage logging."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Allow terraform destroy to delete a non-empty bucket (checkpoints included)."
  type        = bool
  default     = false
}

variable "labels" {
  description = "Labels for the bucket."
  type        = map(string)
  default     = {}
}
