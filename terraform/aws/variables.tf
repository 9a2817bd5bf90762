variable "bucket_name" {
  description = "Name of the S3 bucket that holds the checkpoints (created by this module)."
  type        = string
}

variable "prefix" {
  description = <<-EOT
    Key prefix of the checkpoint root inside the bucket: the library is pointed at
    s3://<bucket_name>/<prefix>/ (latest.ckpt, *.ckpt manifests and chunks/ live right
    below it). The lifecycle rules and the IAM policy are scoped to this prefix.
    No leading or trailing slash.
  EOT
  type        = string
  default     = "checkpoints"

  validation {
    condition     = can(regex("^[^/](.*[^/])?$", var.prefix))
    error_message = "The prefix must be non-empty and must not start or end with '/'."
  }
}

variable "name" {
  description = "Base name of the IAM policy and role."
  type        = string
  default     = "cloudckpt"
}

variable "kms_key_arn" {
  description = "ARN of a KMS key for SSE-KMS default encryption. When null the bucket uses SSE-S3 (AES256)."
  type        = string
  default     = null
}

variable "versioning" {
  description = "Enable bucket versioning. Noncurrent versions expire after noncurrent_version_expiration_days."
  type        = bool
  default     = false
}

variable "noncurrent_version_expiration_days" {
  description = "With versioning on: days after which a noncurrent (overwritten or deleted) version is removed."
  type        = number
  default     = 7

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}

variable "expire_after_days" {
  description = <<-EOT
    Days after which chunks marked by cloudckpt (SweepConfig(cleanup="lifecycle")) are
    deleted. The default equals cloudckpt.storage.lifecycle.EXPIRE_AFTER_DAYS.
  EOT
  type        = number
  default     = 1

  validation {
    condition     = var.expire_after_days >= 1
    error_message = "expire_after_days must be at least 1."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = <<-EOT
    Days after which multipart uploads under the prefix that were never completed
    (a writer died mid-save) are aborted. The default equals
    cloudckpt.storage.lifecycle.EXPIRE_AFTER_DAYS.
  EOT
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_multipart_upload_days >= 1
    error_message = "abort_incomplete_multipart_upload_days must be at least 1."
  }
}

variable "transition_days" {
  description = <<-EOT
    Move chunk objects (the bulk of the data) to transition_storage_class this many
    days after creation. null (the default) disables the transition. STANDARD_IA and
    ONEZONE_IA need at least 30 days.
  EOT
  type        = number
  default     = null
}

variable "transition_storage_class" {
  description = <<-EOT
    Storage class for transition_days. Only classes that are read without a restore
    are allowed, so the library can still load old checkpoints directly.
  EOT
  type        = string
  default     = "STANDARD_IA"

  validation {
    condition     = contains(["STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR"], var.transition_storage_class)
    error_message = "transition_storage_class must be STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING or GLACIER_IR."
  }
}

variable "oidc_provider_arn" {
  description = <<-EOT
    ARN of the EKS cluster's IAM OIDC provider
    (arn:aws:iam::<account>:oidc-provider/oidc.eks.<region>.amazonaws.com/id/<id>).
    When set, an IAM role assumable through IRSA by k8s_namespace/k8s_service_account
    is created and the checkpoint policy is attached to it. When null no role is created.
  EOT
  type        = string
  default     = null
}

variable "k8s_namespace" {
  description = "Kubernetes namespace of the training pods' service account (required with oidc_provider_arn)."
  type        = string
  default     = null
}

variable "k8s_service_account" {
  description = "Kubernetes service account the training pods run as (required with oidc_provider_arn)."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Allow terraform destroy to delete a non-empty bucket (checkpoints included)."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags for every resource this module creates."
  type        = map(string)
  default     = {}
}

variable "access_log_bucket" {
  description = "Name of an existing bucket that receives S3 server access logs for this bucket. null disables access logging."
  type        = string
  default     = null
}

variable "access_log_prefix" {
  description = "Key prefix of the access logs in access_log_bucket."
  type        = string
  default     = "s3-access-logs/"
}
